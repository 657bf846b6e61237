defmodule Quichex.Handler.ConnectionServer do
  @moduledoc false
  # Runs a handler's connection callbacks: the connection's controlling
  # process, started by the connection when its handshake completes and
  # linked to it. Stream callbacks run in each stream's own process
  # (Quichex.Stream.HandlerRunner).

  use GenServer, restart: :temporary

  alias Quichex.{Connection, Handler}

  # A GenServer timeout takes no more.
  @max_timeout Quichex.Config.Schema.max_timeout()

  @doc false
  # Started (not linked by start/3: the connection is not our parent, so its
  # exit reaches handle_info/2) and then linked from init/1.
  def start_link(module, options, conn) do
    {:ok, pid} =
      GenServer.start(__MODULE__, {module, options, conn},
        hibernate_after: Quichex.Connection.Statem.hibernate_after()
      )

    pid
  end

  @impl GenServer
  def init({module, options, conn}) do
    Process.flag(:trap_exit, true)
    Process.link(conn)
    {:ok, %{module: module, state: options, conn: conn}}
  end

  # Calls are not part of a handler's life: a Connection or Stream function
  # given this pid gets an error, and the handler carries on.
  @impl GenServer
  def handle_call(_request, _from, state), do: {:reply, Quichex.Call.unknown_call(), state}

  @impl GenServer
  def handle_info({:quic_connected, conn}, %{conn: conn} = state) do
    result(state.module.handle_connection(conn, state.state), state)
  end

  def handle_info({:quic_early_data, conn, outcome}, %{conn: conn} = state) do
    result(state.module.handle_early_data(outcome, state.state), state)
  end

  def handle_info({:quic_path_created, conn, id, local, peer}, %{conn: conn} = state),
    do: path_event({:path_created, id, local, peer}, state)

  def handle_info({:quic_path_validated, conn, id}, %{conn: conn} = state),
    do: path_event({:path_validated, id}, state)

  def handle_info({:quic_path_failed, conn, id, reason}, %{conn: conn} = state),
    do: path_event({:path_failed, id, reason}, state)

  def handle_info({:quic_peer_migrated, conn, old, new}, %{conn: conn} = state),
    do: path_event({:peer_migrated, old, new}, state)

  def handle_info({:quic_dgram, conn, data}, %{conn: conn} = state) do
    result(state.module.handle_datagram(data, conn, state.state), state)
  end

  def handle_info({:quic_connection_closed, conn, _code, reason}, %{conn: conn} = state),
    do: closed(reason, state)

  def handle_info({:quic_connection_error, conn, reason}, %{conn: conn} = state),
    do: closed(reason, state)

  def handle_info({:EXIT, conn, reason}, %{conn: conn} = state),
    do: closed({:connection_down, reason}, state)

  def handle_info(:timeout, state) do
    result(state.module.handle_timeout(state.conn, state.state), state)
  end

  def handle_info(msg, state) do
    result(state.module.handle_info(msg, state.state), state)
  end

  defp path_event(event, state),
    do: result(state.module.handle_path_event(event, state.conn, state.state), state)

  defp closed(reason, state) do
    state.module.handle_close(state.conn, reason, state.state)
    {:stop, :normal, state}
  end

  defp result({:continue, user}, state), do: {:noreply, %{state | state: user}}

  defp result({:continue, user, timeout}, state)
       when timeout == :infinity or (is_integer(timeout) and timeout in 0..@max_timeout),
       do: {:noreply, %{state | state: user}, timeout}

  defp result({:close, user}, state) do
    close(state.conn, 0, "")
    {:noreply, %{state | state: user}}
  end

  defp result({:error, reason, user}, state) do
    close(state.conn, Handler.error_code(), inspect(reason, limit: 5))

    {:noreply, %{state | state: user}}
  end

  defp result(other, _state) do
    raise ArgumentError,
          "a Quichex.Handler callback returned #{inspect(other)}; see Quichex.Handler.result()"
  end

  # This process learns of the end of the connection by its close message or
  # the link, as for any other end, and stays until then. A close that timed
  # out (the linked connection is alive but did not answer in 5 s) leaves it
  # to that same path, so its result is not acted on.
  defp close(conn, code, reason) do
    _ = Connection.close(conn, error_code: code, reason: reason)
    :ok
  end
end
