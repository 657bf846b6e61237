defmodule Quichex.ListenerTest do
  use ExUnit.Case, async: true

  import Bitwise
  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}

  test "retry: true validates the client address and still connects" do
    {listener, port} = start_listener(retry: true)
    conn = connect!(port)
    server = accept!(listener)
    assert {:ok, %{retry: true}} = Connection.info(conn)
    assert {:ok, %{retry: true}} = Connection.info(server)
    {:ok, stats} = Listener.stats(listener)
    assert stats.retry_sent >= 1
    assert stats.retry_validated >= 1
    assert stats.accepted == 1
    :ok = Connection.close(conn)
    Listener.stop(listener)
  end

  test "without retry, Retry is not used" do
    {listener, port} = start_listener()
    conn = connect!(port)
    assert {:ok, %{retry: false}} = Connection.info(conn)
    assert {:ok, %{retry_sent: 0}} = Listener.stats(listener)
    Listener.stop(listener)
  end

  test "an Initial of an unknown version gets Version Negotiation" do
    {listener, port} = start_listener()
    {:ok, sock} = :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    dcid = :crypto.strong_rand_bytes(8)
    scid = :crypto.strong_rand_bytes(8)
    # Long header, Initial type bits, version 0x1a2a3a4a (reserved, unknown).
    header = <<0xC0, 0x1A2A3A4A::32, 8, dcid::binary, 8, scid::binary>>
    packet = header <> :binary.copy(<<0>>, 1200 - byte_size(header))
    :ok = :gen_udp.send(sock, {127, 0, 0, 1}, port, packet)

    assert {:ok, {_, ^port, vn}} = :gen_udp.recv(sock, 0, 2_000)
    # A Version Negotiation packet: long header, version 0, our IDs swapped,
    # then the supported versions, which include QUIC v1.
    assert <<first, 0::32, 8, ^scid::binary-8, 8, ^dcid::binary-8, versions::binary>> = vn
    assert (first &&& 0x80) != 0
    assert 1 in for(<<v::32 <- versions>>, do: v)
    assert {:ok, %{version_negotiation: 1, accepted: 0}} = Listener.stats(listener)

    # Too small to be an Initial: no answer (no amplification).
    :ok = :gen_udp.send(sock, {127, 0, 0, 1}, port, binary_part(packet, 0, 100))
    assert {:error, :timeout} = :gen_udp.recv(sock, 0, 200)
    :gen_udp.close(sock)
    Listener.stop(listener)
  end

  test "100k random, truncated and garbage datagrams neither crash nor leak, and it keeps accepting" do
    {listener, port} = start_listener()
    {:ok, before} = Listener.stats(listener)

    {:ok, sock} =
      :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: false, sndbuf: 1_048_576])

    # A real Initial to truncate.
    {:ok, capture} = :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    {:ok, capture_port} = :inet.port(capture)

    {:ok, probe} =
      Connection.connect(
        host: "127.0.0.1",
        port: capture_port,
        config: client_config(),
        active: false,
        handshake_timeout: 500
      )

    {:ok, {_, _, initial}} = :gen_udp.recv(capture, 0, 2_000)
    :ok = Connection.close(probe)
    :gen_udp.close(capture)

    :rand.seed(:exsss, {1, 2, 3})
    deadline = System.monotonic_time(:millisecond) + 30_000

    Enum.each(1..100_000, fn i ->
      datagram =
        case rem(i, 4) do
          0 ->
            :crypto.strong_rand_bytes(:rand.uniform(1500))

          1 ->
            binary_part(initial, 0, :rand.uniform(byte_size(initial)) - 1)

          2 ->
            <<0x40, :crypto.strong_rand_bytes(16 + :rand.uniform(60))::binary>>

          3 ->
            <<0xC0, 1::32, :rand.uniform(255),
              :crypto.strong_rand_bytes(:rand.uniform(100))::binary>>
        end

      :ok = :gen_udp.send(sock, {127, 0, 0, 1}, port, datagram)
      # Pace a little so the kernel buffer is not the only thing tested.
      if rem(i, 2_000) == 0 do
        Process.sleep(5)
        assert System.monotonic_time(:millisecond) < deadline
      end
    end)

    :gen_udp.close(sock)

    {:ok, stats} =
      eventually(
        fn ->
          match?({:ok, %{connections: 0}}, Listener.stats(listener)) && Listener.stats(listener)
        end,
        10_000
      )

    assert stats.datagrams_received > before.datagrams_received
    assert stats.unroutable + stats.invalid + stats.version_negotiation > 0
    assert stats.routes == 0
    assert Process.alive?(listener)

    conn = connect!(port)
    assert Connection.is_established?(conn)
    Listener.stop(listener)
  end

  test "200 concurrent handshakes succeed" do
    {listener, port} = start_listener()

    conns =
      1..200
      |> Task.async_stream(
        fn _ ->
          {:ok, conn} =
            Connection.connect(
              host: "127.0.0.1",
              port: port,
              config: client_config(),
              active: false,
              handshake_timeout: 15_000
            )

          {Connection.wait_connected(conn, timeout: 15_000), conn}
        end,
        max_concurrency: 200,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, result} -> result end)

    assert Enum.all?(conns, fn {result, _} -> result == :ok end)
    assert {:ok, %{accepted: 200}} = Listener.stats(listener)
    Enum.each(conns, fn {_, conn} -> Connection.close(conn) end)
    Listener.stop(listener)
  end

  test "at max_connections new Initials are refused without crashing anything" do
    {listener, port} = start_listener(max_connections: 2)
    c1 = connect!(port)
    c2 = connect!(port)

    {:ok, c3} =
      Connection.connect(
        host: "localhost",
        port: port,
        config: client_config(),
        handshake_timeout: 500
      )

    assert {:error, %Quichex.TransportError{reason: :handshake_timeout}} =
             Connection.wait_connected(c3)

    {:ok, stats} = Listener.stats(listener)
    assert stats.refused >= 1
    assert stats.connections == 2
    assert Connection.is_established?(c1) and Connection.is_established?(c2)

    # Room again after a close.
    :ok = Connection.close(c1)
    eventually(fn -> match?({:ok, %{connections: 1}}, Listener.stats(listener)) end)
    assert Connection.is_established?(connect!(port))
    Listener.stop(listener)
  end

  test "stopping a listener closes its connections with CONNECTION_CLOSE" do
    {listener, port} = start_listener()
    conn = connect!(port)
    _server = accept!(listener)
    Listener.stop(listener)

    assert_receive {:quic_connection_closed, ^conn, 0,
                    %Quichex.ApplicationError{code: 0, phrase: "shutdown"}},
                   5_000
  end

  test "a listener is a supervision tree with a child_spec and telemetry" do
    test = self()
    id = {__MODULE__, make_ref()}

    :telemetry.attach_many(
      id,
      [[:quichex, :listener, :start], [:quichex, :listener, :stop]],
      fn event, _m, meta, _ -> send(test, {:telemetry, event, meta}) end,
      nil
    )

    on_exit(fn -> :telemetry.detach(id) end)

    spec = Listener.child_spec(ip: {127, 0, 0, 1}, port: 0, config: server_config(), owner: test)
    {:ok, sup} = Supervisor.start_link([spec], strategy: :one_for_one)
    [{_, listener, :supervisor, _}] = Supervisor.which_children(sup)

    assert_receive {:telemetry, [:quichex, :listener, :start],
                    %{listener: ^listener, local_address: {_, port}}}

    assert %{socket: _, connections: _} = Listener.children(listener)
    assert Connection.is_established?(connect!(port))
    Supervisor.stop(sup)
    assert_receive {:telemetry, [:quichex, :listener, :stop], %{listener: ^listener}}
  end

  test "bad listener options raise ArgumentError naming them" do
    assert_raise ArgumentError, ~r/:config/, fn -> Listener.start_link(port: 0) end

    assert_raise ArgumentError, ~r/load_cert_chain/, fn ->
      Listener.start_link(config: client_config())
    end

    assert_raise ArgumentError, ~r/:max_connections/, fn ->
      Listener.start_link(config: server_config(), max_connections: 0)
    end

    assert_raise ArgumentError, ~r/:ip/, fn ->
      Listener.start_link(config: server_config(), ip: "localhost")
    end

    assert_raise ArgumentError, ~r/:handler/, fn ->
      Listener.start_link(config: server_config(), handler: NoSuchModule)
    end

    assert_raise ArgumentError, ~r/:handler/, fn ->
      Listener.start_link(config: server_config(), active: false)
    end
  end

  test "a port in use is an error, not a crash" do
    {listener, port} = start_listener()
    Process.flag(:trap_exit, true)

    assert {:error, %Quichex.TransportError{reason: {:socket, :eaddrinuse}}} =
             Listener.start_link(ip: {127, 0, 0, 1}, port: port, config: server_config())

    Listener.stop(listener)
  end

  defmodule WaitingConnHandler do
    # Reports each connection and takes it only when told to.
    @behaviour Quichex.ConnectionHandler

    @impl true
    def handle_connection(conn, peer) do
      [{:test, test}] = :ets.lookup(:quichex_listener_test, :test)
      send(test, {:connection, conn, peer, self()})

      receive do
        {:take, pid} -> Quichex.Connection.controlling_process(conn, pid)
        {:fail, reason} -> {:error, reason}
        :raise -> raise "handler failed"
      end
    end
  end

  describe "connection_handler" do
    setup do
      if :ets.whereis(:quichex_listener_test) == :undefined,
        do: :ets.new(:quichex_listener_test, [:named_table, :public])

      :ets.insert(:quichex_listener_test, {:test, self()})
      {listener, port} = start_listener(connection_handler: WaitingConnHandler)
      on_exit(fn -> Listener.stop(listener) end)
      %{listener: listener, port: port}
    end

    test "streams the peer opens before anyone takes the connection wait for its owner", ctx do
      client = connect!(ctx.port)
      assert_receive {:connection, server, _peer, runner}
      {:ok, stream} = Connection.open_stream(client)
      :ok = Quichex.Stream.send(stream, "early", fin: true)
      refute_receive {:quic_stream_opened, _, _, _}, 100

      send(runner, {:take, self()})
      assert_receive {:quic_stream_opened, ^server, peer, :bidirectional}, 2_000
      assert_receive {:quic_stream, ^server, ^peer, "early"}
      assert_receive {:quic_stream_fin, ^server, ^peer}
      assert {:ok, [^server]} = Listener.connections(ctx.listener)
    end

    test "{:error, reason} closes the connection with the handler error code", ctx do
      {:ok, client} =
        Connection.connect(host: "localhost", port: ctx.port, config: client_config())

      assert_receive {:connection, _server, _peer, runner}
      send(runner, {:fail, :no})
      code = Quichex.Handler.error_code()
      assert_receive {:quic_connection_closed, ^client, ^code, %Quichex.ApplicationError{}}, 2_000
    end

    test "a raising callback closes its connection with code 0", ctx do
      {:ok, client} =
        Connection.connect(host: "localhost", port: ctx.port, config: client_config())

      assert_receive {:connection, _server, _peer, runner}

      ExUnit.CaptureLog.capture_log(fn ->
        send(runner, :raise)
        assert_receive {:quic_connection_closed, ^client, 0, %Quichex.ApplicationError{}}, 2_000
      end)
    end

    test "it cannot be combined with :handler, and must exist" do
      assert_raise ArgumentError, ~r/:connection_handler/, fn ->
        Listener.start_link(config: server_config(), connection_handler: NoSuchModule)
      end

      assert_raise ArgumentError, ~r/not both/, fn ->
        Listener.start_link(
          config: server_config(),
          connection_handler: WaitingConnHandler,
          handler: Quichex.HandlerTest.Echo
        )
      end
    end
  end
end
