defmodule Quichex.ApplicationError do
  @moduledoc """
  An error code set by the peer's application.

  `reason` says where the code came from:

    * `:connection_close` - the peer closed the connection with an application
      CONNECTION_CLOSE; `phrase` holds its reason phrase
    * `:stream_reset` - the peer reset a stream it was sending (RESET_STREAM)
    * `:stop_sending` - the peer asked us to stop sending on a stream (STOP_SENDING)
  """

  defexception [:code, :reason, phrase: ""]

  @type t :: %__MODULE__{
          code: non_neg_integer(),
          reason: :connection_close | :stream_reset | :stop_sending,
          phrase: binary()
        }

  @impl true
  def message(%__MODULE__{code: code, reason: reason, phrase: phrase}) do
    base = "peer application error #{code} (#{reason})"
    if phrase in [nil, ""], do: base, else: base <> ": " <> inspect(phrase)
  end
end
