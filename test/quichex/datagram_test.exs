defmodule Quichex.DatagramTest do
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}

  @dgram [enable_dgram: true]

  defmodule EchoDgrams do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_datagram(data, conn, state) do
      _ = Quichex.Connection.dgram_send(conn, data)
      {:continue, state}
    end
  end

  defp pair(opts \\ []) do
    {listener, port} =
      start_listener(Keyword.merge([config_opts: @dgram], Keyword.get(opts, :listener, [])))

    on_exit(fn -> Listener.stop(listener) end)
    client = connect!(port, Keyword.merge([config_opts: @dgram], Keyword.get(opts, :client, [])))
    {client, accept!(listener)}
  end

  defp echo_server(config_opts \\ @dgram) do
    {listener, port} = start_listener(handler: EchoDgrams, config_opts: config_opts)
    on_exit(fn -> Listener.stop(listener) end)
    port
  end

  describe "both ways, active" do
    test "datagrams arrive as messages, in order, and stats count them" do
      {client, server} = pair()
      {:ok, max} = Connection.dgram_max_size(client)
      assert max > 1000

      for i <- 1..100, do: :ok = Connection.dgram_send(client, ["up ", Integer.to_string(i)])

      received = for _ <- 1..100, do: receive_dgram(server)
      assert received == for(i <- 1..100, do: "up #{i}")

      for i <- 1..50, do: :ok = Connection.dgram_send(server, "down #{i}")
      assert for(_ <- 1..50, do: receive_dgram(client)) == for(i <- 1..50, do: "down #{i}")

      {:ok, stats} = Connection.stats(client)
      assert stats.dgrams_sent == 100
      assert stats.dgrams_received == 50
      assert stats.dgrams_dropped_on_receive == 0
      assert stats.dgrams_dropped_on_send == 0
    end
  end

  defp receive_dgram(conn) do
    receive do
      {:quic_dgram, ^conn, data} -> data
    after
      5_000 -> flunk("no datagram within 5 s")
    end
  end

  describe "passive" do
    test "dgram_recv/2 takes them in order; a timeout when none comes" do
      port = echo_server()
      client = connect!(port, active: false, config_opts: @dgram)

      for i <- 1..20, do: :ok = Connection.dgram_send(client, "ping #{i}")

      for i <- 1..20 do
        assert {:ok, "ping #{i}"} == Connection.dgram_recv(client, timeout: 5_000)
      end

      assert {:error, :timeout} = Connection.dgram_recv(client, timeout: 20)
    end

    test "dgram_recv/2 on an active connection is an error" do
      port = echo_server()
      client = connect!(port, config_opts: @dgram)
      assert {:error, :active} = Connection.dgram_recv(client, timeout: 10)
    end

    test "a full receive queue drops the oldest and counts it" do
      port = echo_server()
      client = connect!(port, active: false, config_opts: @dgram ++ [dgram_recv_queue_len: 5])

      for i <- 1..50, do: :ok = Connection.dgram_send(client, "d#{i}")

      eventually(fn ->
        {:ok, stats} = Connection.stats(client)
        stats.dgrams_received + stats.dgrams_dropped_on_receive >= 50
      end)

      got = for _ <- 1..5, do: elem(Connection.dgram_recv(client, timeout: 1_000), 1)
      # The newest five are kept.
      assert got == for(i <- 46..50, do: "d#{i}")
      {:ok, stats} = Connection.stats(client)
      assert stats.dgrams_dropped_on_receive == 45
    end
  end

  describe "clear errors" do
    test "a datagram too big for the path" do
      {client, _server} = pair()
      {:ok, max} = Connection.dgram_max_size(client)

      assert {:error, {:too_big, ^max}} =
               Connection.dgram_send(client, :binary.copy("x", max + 1))

      assert :ok = Connection.dgram_send(client, :binary.copy("x", max))
    end

    test "the send queue is full" do
      {client, _server} = pair(client: [config_opts: @dgram ++ [dgram_send_queue_len: 2]])
      test = self()
      # The connection is suspended: no driver pass can drain the queue
      # while the ten sends take their room.
      :ok = :sys.suspend(client)

      for i <- 1..10 do
        spawn_link(fn -> send(test, {:sent, i, Connection.dgram_send(client, "q#{i}")}) end)
      end

      results = for _ <- 1..10, do: receive_sent()
      assert Enum.count(results, &(&1 == :ok)) == 2
      assert Enum.count(results, &(&1 == {:error, :queue_full})) == 8
      :ok = :sys.resume(client)
      {:ok, stats} = Connection.stats(client)
      assert stats.dgrams_dropped_on_send == 8
    end

    test "a peer without datagram support" do
      port = echo_server([])
      client = connect!(port, config_opts: @dgram)
      assert {:error, :not_negotiated} = Connection.dgram_send(client, "x")
      assert {:error, :not_negotiated} = Connection.dgram_max_size(client)
    end

    test "datagrams not enabled on our side" do
      port = echo_server()
      client = connect!(port)
      assert {:error, :disabled} = Connection.dgram_send(client, "x")
      assert {:error, :disabled} = Connection.dgram_max_size(client)
    end

    test "bad arguments and a closed connection" do
      {client, _server} = pair()
      assert_raise ArgumentError, fn -> Connection.dgram_send(client, :not_iodata) end
      :ok = Connection.close(client)
      eventually(fn -> not Process.alive?(client) end)
      assert {:error, :closed} = Connection.dgram_send(client, "x")
      assert {:error, :closed} = Connection.dgram_recv(client, timeout: 10)
    end
  end

  defp receive_sent do
    receive do
      {:sent, _i, result} -> result
    after
      5_000 -> flunk("a dgram_send did not return")
    end
  end

  test "a handler gets handle_datagram/3 and answers" do
    port = echo_server()
    client = connect!(port, config_opts: @dgram)
    :ok = Connection.dgram_send(client, "hello handler")
    assert receive_dgram(client) == "hello handler"
  end

  test "datagrams sent during the handshake wait for it" do
    port = echo_server()

    {:ok, client} =
      Connection.connect(host: "localhost", port: port, config: client_config(@dgram))

    assert :ok = Connection.dgram_send(client, "early")
    assert receive_dgram(client) == "early"
  end
end
