defmodule Quichex.ApplicationError do
  @moduledoc """
  An error code set by the peer's application: the peer closed the
  connection with an application CONNECTION_CLOSE. It is the `reason` of
  `{:quic_connection_closed, conn, code, reason}` (and of
  `{:quic_connection_error, ...}` when that happens during the handshake).

  `reason` is always `:connection_close`; `code` is the peer's application
  error code and `phrase` its reason phrase.

  A peer's stream-level codes are not wrapped in this struct: RESET_STREAM
  arrives as `{:quic_stream_reset, conn, stream, code}` or
  `{:error, {:reset, code}}`, STOP_SENDING as
  `{:quic_stream_stopped, conn, stream, code}` or
  `{:error, {:stopped, code}}` (see `Quichex.Stream`).

      receive do
        {:quic_connection_closed, ^conn, code, %Quichex.ApplicationError{phrase: phrase}} ->
          Logger.info("peer closed the connection: code \#{code}, \#{inspect(phrase)}")
      end

  As an exception, its message names the code and the phrase:

      iex> Exception.message(%Quichex.ApplicationError{code: 7, phrase: "bye"})
      ~s[peer application error 7 (connection_close): "bye"]
  """

  defexception [:code, reason: :connection_close, phrase: ""]

  @type t :: %__MODULE__{
          code: non_neg_integer(),
          reason: :connection_close,
          phrase: binary()
        }

  @doc false
  # The one constructor the library uses.
  def new(code, phrase), do: %__MODULE__{code: code, reason: :connection_close, phrase: phrase}

  @impl true
  def message(%__MODULE__{code: code, reason: reason, phrase: phrase}) do
    base = "peer application error #{code} (#{reason})"
    if phrase in [nil, ""], do: base, else: base <> ": " <> inspect(phrase)
  end
end
