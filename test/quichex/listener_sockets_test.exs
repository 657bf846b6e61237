defmodule Quichex.ListenerSocketsTest do
  # A listener with several SO_REUSEPORT sockets: clients spread over them,
  # every socket routes every connection, a socket process that dies comes
  # back on the same port without touching the connections.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}
  alias Quichex.Test.FaultProxy

  @loopback {127, 0, 0, 1}

  defmodule Echo do
    use Quichex.Handler

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

  defp listener!(opts) do
    {listener, port} = start_listener([handler: Echo] ++ opts)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  defp echo!(conn, size) do
    payload = :crypto.strong_rand_bytes(size)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    sender = Task.async(fn -> Stream.send(stream, payload, fin: true, timeout: 30_000) end)
    assert read_all(stream, []) == payload
    assert :ok = Task.await(sender, 30_000)
  end

  defp read_all(stream, acc) do
    case Stream.recv(stream, timeout: 20_000) do
      {:ok, data, true} -> IO.iodata_to_binary([acc | data])
      {:ok, data, false} -> read_all(stream, [acc | data])
    end
  end

  test "200 connections spread over 4 sockets, byte-exact" do
    {listener, port} = listener!(sockets: 4)
    {:ok, stats} = Listener.stats(listener)
    assert length(stats.sockets) == 4

    1..200
    |> Task.async_stream(
      fn _ ->
        conn = connect!(port)
        echo!(conn, 20_000)
        :ok = Connection.close(conn)
      end,
      max_concurrency: 20,
      timeout: 60_000
    )
    |> Enum.each(fn result -> assert {:ok, :ok} = result end)

    {:ok, stats} = Listener.stats(listener)
    assert stats.accepted == 200
    # The kernel hashed the 200 clients over every socket.
    for socket <- stats.sockets, do: assert(socket.accepted > 0)
    assert Enum.sum(Enum.map(stats.sockets, & &1.accepted)) == 200
    eventually(fn -> match?({:ok, %{connections: 0, routes: 0}}, Listener.stats(listener)) end)
  end

  test "a client whose source port changes is still served, whichever socket gets it" do
    {_listener, listener_port} = listener!(sockets: 4)
    {:ok, proxy, port} = FaultProxy.start_link(upstream: {@loopback, listener_port})
    conn = connect!(port, host: @loopback, server_name: "localhost")

    for _ <- 1..4 do
      FaultProxy.rebind(proxy)
      echo!(conn, 200_000)
    end
  end

  test "a socket process that dies restarts on the same port; connections and routes stay" do
    {listener, port} = listener!(sockets: 2)
    conns = for _ <- 1..20, do: connect!(port)
    for conn <- conns, do: echo!(conn, 10_000)

    %{sockets: [victim, survivor]} = Listener.children(listener)
    {:ok, %{routes: routes}} = Listener.stats(listener)
    ref = Process.monitor(victim)
    Process.exit(victim, :kill)
    assert_receive {:DOWN, ^ref, :process, _, :killed}

    eventually(fn ->
      match?(%{sockets: [new, ^survivor]} when new != victim, Listener.children(listener))
    end)

    assert {:ok, {_, ^port}} = Listener.sockname(listener)
    assert {:ok, %{routes: ^routes, connections: 20}} = Listener.stats(listener)

    # Every connection still works, including those that sent on the
    # socket that died; and new clients connect.
    for conn <- conns, do: echo!(conn, 10_000)
    echo!(connect!(port), 10_000)
  end

  test "sockets: must be a positive integer" do
    assert_raise ArgumentError, ~r/:sockets/, fn ->
      Listener.start_link(config: server_config(), handler: Echo, sockets: 0)
    end
  end
end
