defmodule Quichex.Stream.HandlerRunner do
  @moduledoc false
  # Runs a `Quichex.Handler`'s stream callbacks inside the stream's own
  # process (one process per stream): data, the end of the stream and the
  # peer's STOP_SENDING become callbacks, in order; each callback's result
  # decides what the stream does next.
  #
  # A callback that raises takes down only its stream: the stream is aborted
  # with the owner-down code (RESET_STREAM unless our FIN was accepted,
  # STOP_SENDING unless the peer finished) and the process ends.

  require Logger

  alias Quichex.Handler
  alias Quichex.Stream.{Receiver, Server}

  defstruct [:module, :state, timeout: :infinity]

  # The `after` of the stream's receive loop takes no more.
  @max_timeout Quichex.Config.Schema.max_timeout()

  @type t :: %__MODULE__{module: module(), state: term(), timeout: timeout()}

  def open(stream, module, options) do
    stream = %{stream | handler: %__MODULE__{module: module, state: options}}
    run(stream, :handle_stream_open, [self()])
  end

  def timeout(nil), do: :infinity
  def timeout(%__MODULE__{timeout: timeout}), do: timeout

  def timeout_expired(stream), do: run(stream, :handle_timeout, [self()])

  def stopped(stream, code), do: run(stream, :handle_stopped, [code, self()])

  def info(stream, msg), do: run(stream, :handle_info, [msg, self()])

  @doc "Runs a callback for everything due: buffered data, then the FIN or reset."
  def deliver(%{recv_done: true} = stream), do: {:cont, stream}

  def deliver(%{buffered: n} = stream) when n > 0 do
    data = stream.buffer |> Enum.reverse() |> IO.iodata_to_binary()
    stream = %{stream | buffer: [], buffered: 0}
    continue(run(stream, :handle_data, [data, self()]))
  end

  def deliver(%{fin: true} = stream), do: run(%{stream | recv_done: true}, :handle_fin, [self()])

  def deliver(%{reset: code} = stream) when code != nil,
    do: run(%{stream | recv_done: true}, :handle_reset, [code, self()])

  def deliver(stream), do: {:cont, Receiver.give_credit(stream)}

  defp continue({:cont, stream}), do: deliver(stream)
  defp continue(stop), do: stop

  # Calls `callback` with `args ++ [handler_state]` and applies its result.
  defp run(%{handler: %__MODULE__{module: module} = handler} = stream, callback, args) do
    result = apply(module, callback, args ++ [handler.state])
    result(stream, result)
  catch
    kind, reason ->
      Logger.error(
        "Quichex.Handler #{inspect(stream.handler.module)}.#{callback} failed on stream #{stream.id}: " <>
          Exception.format(kind, reason, __STACKTRACE__)
      )

      {:stop, {:shutdown, {:abort, Server.owner_down_code()}}, stream}
  end

  defp result(stream, {:continue, user}), do: {:cont, put(stream, user, :infinity)}

  defp result(stream, {:continue, user, timeout})
       when timeout == :infinity or (is_integer(timeout) and timeout in 0..@max_timeout) do
    {:cont, put(stream, user, timeout)}
  end

  defp result(stream, {:close, user}) do
    stream = put(stream, user, :infinity)

    stream =
      if stream.send == :open do
        case Quichex.Stream.close(self()) do
          # :finished: the callback already sent our FIN.
          result when result in [:ok, {:error, :finished}] -> %{stream | send: :fin}
          _error -> stream
        end
      else
        stream
      end

    cond do
      stream.recv_done and stream.send != :open -> {:stop, :normal, stream}
      # STOP_SENDING (code 0) unless the peer finished; a FIN that could not
      # be sent becomes a reset.
      true -> {:stop, {:shutdown, {:abort, 0}}, stream}
    end
  end

  defp result(stream, {:error, _reason, user}),
    do: {:stop, {:shutdown, {:abort, Handler.error_code()}}, put(stream, user, :infinity)}

  defp result(_stream, other) do
    raise ArgumentError,
          "a Quichex.Handler callback returned #{inspect(other)}; see Quichex.Handler.result()"
  end

  defp put(stream, user, timeout),
    do: %{stream | handler: %{stream.handler | state: user, timeout: timeout}}
end
