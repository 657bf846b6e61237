defmodule Quichex.Handler.StreamServer do
  @moduledoc false
  # Runs a handler's stream callbacks for one peer-initiated stream. The
  # stream is created with active: :once and re-armed after each callback.

  use GenServer, restart: :temporary

  alias Quichex.{Handler, Stream}

  def start_link({module, options, conn}),
    do: GenServer.start_link(__MODULE__, {module, options, conn})

  @impl GenServer
  def init({module, options, conn}) do
    {:ok, %{module: module, state: options, conn: conn, stream: nil, read_done: false}}
  end

  @impl GenServer
  def handle_info({:quic_stream_opened, _conn, stream, _direction}, %{stream: nil} = state) do
    Process.monitor(stream)
    state = %{state | stream: stream}
    result(state.module.handle_stream_open(stream, state.state), state, false)
  end

  # Messages about other streams (ones the handler opened itself) go to
  # handle_info/3 like any other message.
  def handle_info({:quic_stream, _conn, stream, data}, %{stream: stream} = state) do
    result(state.module.handle_data(data, stream, state.state), state, true)
  end

  def handle_info({:quic_stream_fin, _conn, stream}, %{stream: stream} = state) do
    state = %{state | read_done: true}
    result(state.module.handle_fin(stream, state.state), state, false)
  end

  def handle_info({:quic_stream_reset, _conn, stream, code}, %{stream: stream} = state) do
    state = %{state | read_done: true}
    result(state.module.handle_reset(code, stream, state.state), state, false)
  end

  def handle_info({:quic_stream_stopped, _conn, stream, code}, %{stream: stream} = state) do
    result(state.module.handle_stopped(code, stream, state.state), state, false)
  end

  def handle_info({:quic_stream_closed, _conn, _stream, _reason}, state),
    do: {:stop, :normal, state}

  def handle_info({:DOWN, _ref, :process, stream, _reason}, %{stream: stream} = state) do
    {:stop, :normal, state}
  end

  def handle_info(:timeout, state) do
    result(state.module.handle_timeout(state.stream, state.state), state, false)
  end

  def handle_info(msg, state) do
    result(state.module.handle_info(msg, state.stream, state.state), state, false)
  end

  defp result({:continue, user}, state, rearm?) do
    rearm(state, rearm?)
    {:noreply, %{state | state: user}}
  end

  defp result({:continue, user, timeout}, state, rearm?) do
    rearm(state, rearm?)
    {:noreply, %{state | state: user}, timeout}
  end

  defp result({:close, user}, state, _rearm?) do
    if state.stream do
      _ = Stream.close(state.stream)
      if not state.read_done, do: Stream.shutdown(state.stream, :read, error_code: 0)
    end

    {:stop, :normal, %{state | state: user}}
  end

  defp result({:error, _reason, user}, state, _rearm?) do
    if state.stream, do: Stream.shutdown(state.stream, :both, error_code: Handler.error_code())
    {:stop, :normal, %{state | state: user}}
  end

  defp result(other, _state, _rearm?) do
    raise ArgumentError,
          "a Quichex.Handler callback returned #{inspect(other)}; see Quichex.Handler.result()"
  end

  defp rearm(%{stream: stream}, true) when is_pid(stream),
    do: GenServer.cast(stream, {:setopts, :once})

  defp rearm(_state, _), do: :ok
end
