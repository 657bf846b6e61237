defmodule Quichex.SupervisionTest do
  # Killing each process of a listener's tree (guides/architecture.md draws
  # it): each restarts or ends as documented, the other connections carry
  # on, and the clients concerned are told, without waiting for an idle
  # timeout. The socket process is covered in listener_sockets_test.exs.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Quichex.Test.Helpers

  alias Quichex.{ApplicationError, Connection, Listener, Stream, TransportError}

  defmodule Echo do
    use Quichex.Handler

    # Tells the test which process runs this connection's callbacks.
    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = state) do
      send(test, {:handler_up, conn, self()})
      {:continue, state}
    end

    def handle_connection(_conn, state), do: {:continue, state}

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      case Quichex.Stream.send(stream, data, timeout: 30_000) do
        :ok -> {:continue, state}
        {:error, _} -> {:close, state}
      end
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      _ = Quichex.Stream.close(stream)
      {:close, state}
    end
  end

  defp listener!(opts \\ []) do
    {listener, port} = start_listener([handler: Echo, handler_options: %{test: self()}] ++ opts)
    on_exit(fn -> if Process.alive?(listener), do: Listener.stop(listener) end)
    {listener, port}
  end

  # Connects a client and returns it with the server-side handler process
  # and connection.
  defp client!(port) do
    conn = connect!(port)
    assert_receive {:handler_up, server_conn, handler}
    {conn, server_conn, handler}
  end

  defp echo!(conn) do
    payload = :crypto.strong_rand_bytes(5_000)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, payload, fin: true, timeout: 10_000)
    assert read_all(stream, []) == payload
  end

  defp read_all(stream, acc) do
    case Stream.recv(stream, timeout: 10_000) do
      {:ok, data, true} -> IO.iodata_to_binary([acc | data])
      {:ok, data, false} -> read_all(stream, [acc | data])
    end
  end

  # A client whose server went away hears of it at its next packet, well
  # before its 30 s idle timeout.
  defp poke(conn) do
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    _ = Stream.send(stream, "anyone there?")
    :ok
  end

  test "a server connection killed: its routes go, its client is reset, the others carry on" do
    {listener, port} = listener!()
    [{victim, victim_server, _}, {other, _, _}] = for _ <- 1..2, do: client!(port)
    {:ok, %{routes: routes}} = Listener.stats(listener)

    ref = Process.monitor(victim_server)
    Process.exit(victim_server, :kill)
    assert_receive {:DOWN, ^ref, :process, _, :killed}

    # The registry gives back the dead connection's routes and slot.
    eventually(fn ->
      match?({:ok, %{connections: 1, routes: r}} when r < routes, Listener.stats(listener))
    end)

    poke(victim)

    assert_receive {:quic_connection_closed, ^victim, 0,
                    %TransportError{reason: :stateless_reset}},
                   5_000

    echo!(other)
    {new, _, _} = client!(port)
    echo!(new)
  end

  test "a handler's connection process killed: its connection closes and tells the client" do
    {listener, port} = listener!()
    {victim, victim_server, handler} = client!(port)
    {other, _, _} = client!(port)
    server_ref = Process.monitor(victim_server)

    Process.exit(handler, :kill)

    # The handler was the connection's controlling process: its exit closes
    # the connection with application code 0, which the client hears.
    assert_receive {:quic_connection_closed, ^victim, 0, %ApplicationError{code: 0}}, 5_000
    assert_receive {:DOWN, ^server_ref, :process, _, _}, 5_000
    eventually(fn -> match?({:ok, %{connections: 1}}, Listener.stats(listener)) end)
    echo!(other)
  end

  test "the connections supervisor killed: the listener stops as a whole, every client is told" do
    {listener, port} = listener!()
    clients = for _ <- 1..3, do: client!(port)
    %{connections: sup} = Listener.children(listener)
    Process.unlink(listener)
    listener_ref = Process.monitor(listener)
    server_refs = for {_, server_conn, _} <- clients, do: Process.monitor(server_conn)

    capture_log(fn ->
      Process.exit(sup, :kill)
      # max_restarts: 0 at the top: no half-restarted listener.
      assert_receive {:DOWN, ^listener_ref, :process, _, _}, 5_000
      for ref <- server_refs, do: assert_receive({:DOWN, ^ref, :process, _, _}, 5_000)
    end)

    # Each connection ran its terminate/3 (trapping exits) and closed; a
    # client whose CONNECTION_CLOSE raced the sockets' shutdown hears at
    # its next packet (nothing answers: ICMP or idle), so it is poked and
    # must hear within a bounded time either way.
    for {conn, _, _} <- clients do
      receive do
        {:quic_connection_closed, ^conn, _, _} -> :ok
      after
        1_000 ->
          poke(conn)
          assert_receive {:quic_connection_closed, ^conn, _, _}, 35_000
      end
    end

    # The port is free again: a new listener can take it.
    {listener2, ^port} = start_listener(handler: Echo, port: port)
    on_exit(fn -> Listener.stop(listener2) end)
    echo!(connect!(port))
  end

  test "the sockets supervisor or the registry killed: the listener stops, its connections end" do
    for child <- [:sockets_sup, :registry] do
      {listener, port} = listener!()
      {_conn, server_conn, _} = client!(port)
      children = Listener.children(listener)
      victim = Map.fetch!(children, child)
      Process.unlink(listener)
      refs = Enum.map([listener, server_conn | children.sockets], &Process.monitor/1)

      capture_log(fn ->
        Process.exit(victim, :kill)
        for ref <- refs, do: assert_receive({:DOWN, ^ref, :process, _, _}, 5_000)
      end)

      assert {:error, :closed} = Listener.stats(listener)
    end
  end
end
