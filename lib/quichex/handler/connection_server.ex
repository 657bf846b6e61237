defmodule Quichex.Handler.ConnectionServer do
  @moduledoc false
  # Runs a handler's connection callbacks; the connection's controlling process.

  use GenServer, restart: :temporary

  alias Quichex.{Connection, Handler}

  def start_link({module, options}), do: GenServer.start_link(__MODULE__, {module, options})

  @impl GenServer
  def init({module, options}) do
    {:ok, %{module: module, state: options, conn: nil, conn_ref: nil}}
  end

  @impl GenServer
  def handle_info({:quichex_attach, conn}, state) do
    {:noreply, attach(state, conn)}
  end

  def handle_info({:quic_connected, conn}, state) do
    state = attach(state, conn)
    result(state.module.handle_connection(conn, state.state), state)
  end

  def handle_info({:quic_connection_closed, conn, _code, reason}, state),
    do: closed(conn, reason, state)

  def handle_info({:quic_connection_error, conn, reason}, state), do: closed(conn, reason, state)

  def handle_info({:DOWN, ref, :process, _pid, reason}, %{conn_ref: ref} = state) do
    closed(state.conn, {:connection_down, reason}, state)
  end

  def handle_info(:timeout, state) do
    result(state.module.handle_timeout(state.conn, state.state), state)
  end

  def handle_info(msg, state) do
    result(state.module.handle_info(msg, state.state), state)
  end

  defp attach(%{conn: nil} = state, conn),
    do: %{state | conn: conn, conn_ref: Process.monitor(conn)}

  defp attach(state, _conn), do: state

  defp closed(conn, reason, state) do
    state.module.handle_close(conn, reason, state.state)
    {:stop, :normal, state}
  end

  defp result({:continue, user}, state), do: {:noreply, %{state | state: user}}

  defp result({:continue, user, timeout}, state), do: {:noreply, %{state | state: user}, timeout}

  defp result({:close, user}, state) do
    if state.conn, do: Connection.close(state.conn, error_code: 0, reason: "")
    {:noreply, %{state | state: user}}
  end

  defp result({:error, reason, user}, state) do
    if state.conn do
      Connection.close(state.conn,
        error_code: Handler.error_code(),
        reason: inspect(reason, limit: 5)
      )
    end

    {:noreply, %{state | state: user}}
  end

  defp result(other, _state) do
    raise ArgumentError,
          "a Quichex.Handler callback returned #{inspect(other)}; see Quichex.Handler.result()"
  end
end
