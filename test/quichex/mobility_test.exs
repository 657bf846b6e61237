defmodule Quichex.MobilityTest do
  # Connection migration, path events, connection IDs and stateless resets.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream, TransportError}
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
    def handle_path_event(event, conn, %{test: test} = state) do
      send(test, {:handler_path_event, conn, event})
      {:continue, state}
    end

    def handle_path_event(_event, _conn, state), do: {:continue, state}
  end

  defmodule TaggedCIDs do
    # Every connection ID starts with 0xAB; each one made is reported.
    @behaviour Quichex.CIDGenerator

    @impl true
    def generate_cid(length, test) do
      cid = <<0xAB>> <> :crypto.strong_rand_bytes(length - 1)
      send(test, {:cid_made, cid})
      cid
    end
  end

  # Echoes `size` random bytes through `stream` from a task while this
  # process reads the echo; `midway.()` runs once a third has come back.
  defp echo_through(stream, size, midway) do
    payload = :crypto.strong_rand_bytes(size)
    sender = Task.async(fn -> Stream.send(stream, payload, fin: true, timeout: 60_000) end)
    received = read(stream, [], 0, div(size, 3), midway)
    assert :ok = Task.await(sender, 60_000)
    assert byte_size(received) == size
    assert received == payload
  end

  defp read(stream, acc, got, mark, midway) do
    case Stream.recv(stream, timeout: 20_000) do
      {:ok, data, fin} ->
        got2 = got + byte_size(data)
        if got < mark and got2 >= mark, do: midway.()
        acc = [acc | data]
        if fin, do: IO.iodata_to_binary(acc), else: read(stream, acc, got2, mark, midway)

      error ->
        flunk("read failed after #{got} bytes: #{inspect(error)}")
    end
  end

  defp active_server(opts) do
    {listener, port} = start_listener(opts)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  describe "migration" do
    test "a client moves to a new local port while echoing 20 MB; both sides see the path events" do
      {listener, port} = active_server(stream_opts: [active: false])
      conn = connect!(port, host: @loopback, server_name: "localhost", local_address: @loopback)
      server = accept!(listener)
      {:ok, %{local_address: old_local}} = Connection.info(conn)

      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      :ok = Stream.send(stream, "x")
      assert_receive {:quic_stream_opened, ^server, peer_stream, _}
      {:ok, "x", false} = Stream.recv(peer_stream)

      # The server side echoes from a task.
      echo =
        Task.async(fn ->
          loop = fn loop ->
            case Stream.recv(peer_stream, timeout: 30_000) do
              {:ok, data, fin} ->
                :ok = Stream.send(peer_stream, data, fin: fin, timeout: 30_000)
                if fin, do: :ok, else: loop.(loop)

              error ->
                error
            end
          end

          loop.(loop)
        end)

      :ok = Stream.controlling_process(peer_stream, echo.pid)

      test = self()

      echo_through(stream, 20_000_000, fn ->
        send(test, {:migrated, Connection.migrate(conn, {@loopback, 0})})
      end)

      assert_receive {:migrated, {:ok, path_id}}
      assert_receive {:quic_path_created, ^conn, ^path_id, new_local, {@loopback, ^port}}
      assert_receive {:quic_path_validated, ^conn, ^path_id}
      assert new_local != old_local
      assert {:ok, %{local_address: ^new_local}} = Connection.info(conn)

      assert {:ok, %{id: ^path_id, local: ^new_local, active: true}} =
               Connection.active_path(conn)

      # The server followed the client to its new address.
      assert_receive {:quic_peer_migrated, ^server, ^old_local, ^new_local}, 5_000
      assert_receive {:quic_path_created, ^server, _id, _local, ^new_local}
      assert {:ok, %{peer_address: ^new_local}} = Connection.info(server)
      assert :ok = Task.await(echo, 30_000)
    end

    test "NAT rebinding: the proxy's source port changes mid-transfer, the connection follows" do
      {listener, listener_port} = active_server(handler: Echo, handler_options: %{test: self()})

      {:ok, proxy, port} = FaultProxy.start_link(upstream: {@loopback, listener_port})
      conn = connect!(port, host: @loopback, server_name: "localhost")
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)

      echo_through(stream, 5_000_000, fn -> FaultProxy.rebind(proxy) end)

      {:ok, [server]} = Listener.connections(listener)
      {:ok, %{peer_address: {@loopback, peer_port}}} = Connection.info(server)
      assert peer_port != listener_port
      {:ok, paths} = Connection.paths(server)
      assert length(paths) >= 2

      # The server's handler was told.
      assert_receive {:handler_path_event, ^server,
                      {:peer_migrated, {@loopback, old_port}, {@loopback, ^peer_port}}}

      assert old_port != peer_port

      assert_receive {:handler_path_event, ^server,
                      {:path_created, _id, _local, {@loopback, ^peer_port}}}
    end

    test "a path nobody answers fails; the connection stays where it was" do
      {_listener, port} = active_server(handler: Echo)
      conn = connect!(port, host: @loopback, server_name: "localhost")
      {:ok, silent} = :gen_udp.open(0, ip: @loopback)
      {:ok, silent_port} = :inet.port(silent)

      assert {:error, :validation_failed} =
               Connection.migrate(conn, {@loopback, 0}, {@loopback, silent_port}, timeout: 30_000)

      assert_receive {:quic_path_created, ^conn, id, _local, {@loopback, ^silent_port}}
      assert_receive {:quic_path_failed, ^conn, ^id, :validation_failed}
      assert {:ok, %{peer_address: {@loopback, ^port}}} = Connection.info(conn)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      echo_through(stream, 10_000, fn -> :ok end)
    end

    test "a migration that runs out of time answers :timeout and closes its socket" do
      {_listener, port} = active_server(handler: Echo)
      conn = connect!(port, host: @loopback, server_name: "localhost")
      {:ok, silent} = :gen_udp.open(0, ip: @loopback)
      {:ok, silent_port} = :inet.port(silent)

      assert {:error, :timeout} =
               Connection.migrate(conn, {@loopback, 0}, {@loopback, silent_port}, timeout: 200)

      {_state, data} = :sys.get_state(conn)
      assert data.paths.sockets == %{}
      assert data.paths.pending == %{}
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      echo_through(stream, 10_000, fn -> :ok end)
    end

    test "probe_path/4 validates a path without moving; path_stats/3" do
      {_listener, port} = active_server(handler: Echo)
      conn = connect!(port, host: @loopback, server_name: "localhost")
      {:ok, %{local_address: local}} = Connection.info(conn)
      assert {:ok, id} = Connection.probe_path(conn, {@loopback, 0}, nil)
      assert_receive {:quic_path_validated, ^conn, ^id}
      assert {:ok, %{local_address: ^local}} = Connection.info(conn)

      assert {:ok, %{id: ^id, active: false, validation: :validated, rtt: rtt}} =
               Connection.path_stats(conn, id)

      assert rtt > 0
      assert {:ok, %{id: 0, active: true}} = Connection.path_stats(conn, 0)
      assert {:error, :unknown_path} = Connection.path_stats(conn, 99)
    end

    test "the server's disable_active_migration is honoured; servers do not migrate" do
      {listener, port} = active_server(config_opts: [disable_active_migration: true])
      conn = connect!(port, host: @loopback, server_name: "localhost")
      assert {:error, :migration_disabled} = Connection.migrate(conn, {@loopback, 0})
      server = accept!(listener)
      assert {:error, :server} = Connection.migrate(server, {@loopback, 0})
      assert_raise ArgumentError, ~r/:local_address/, fn -> Connection.migrate(conn, :nope) end
    end
  end

  describe "connection IDs" do
    test "rotation during a transfer; routes follow; a custom generator makes every ID" do
      test = self()

      {listener, port} = active_server(handler: Echo, connection_id_generator: {TaggedCIDs, test})

      conn = connect!(port)
      {:ok, [server]} = Listener.connections(listener)

      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)

      echo_through(stream, 5_000_000, fn ->
        send(test, {:rotated, Connection.rotate_cid(server)})
      end)

      assert_receive {:rotated, {:ok, <<0xAB, _::binary>> = fresh}}
      made = collect_cids([])
      assert fresh in made

      # The listener routes the IDs in use: ours, and the one the client
      # chose for its first Initial.
      routes = routes(listener)
      assert Enum.count(routes, &match?(<<0xAB, _::binary>>, &1)) >= 2
      assert Enum.count(routes, &(not match?(<<0xAB, _::binary>>, &1))) <= 1

      {:ok, %{source_id: <<0xAB, _::binary>>}} = Connection.info(server)
    end

    test "routes are removed when connections end: no growth over 1,000 connections" do
      {listener, port} = active_server(handler: Echo)

      for _ <- 1..1_000 do
        conn = connect!(port)
        :ok = Connection.close(conn)
      end

      eventually(
        fn -> match?({:ok, %{connections: 0, routes: 0}}, Listener.stats(listener)) end,
        15_000
      )
    end
  end

  defp collect_cids(acc) do
    receive do
      {:cid_made, cid} -> collect_cids([cid | acc])
    after
      0 -> acc
    end
  end

  defp routes(listener) do
    %{shared: shared} = Listener.children(listener)
    for {cid, _pid} <- :ets.tab2list(shared.routes), do: cid
  end

  describe "stateless reset" do
    test "a listener restarted with the same key resets the old connection at once" do
      key = :crypto.strong_rand_bytes(32)
      {listener, port} = start_listener(handler: Echo, stateless_reset_key: key)
      conn = connect!(port)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      echo_through(stream, 1_000, fn -> :ok end)

      # A crash, not a shutdown: the connection dies without telling the
      # client, then the listener goes.
      {:ok, [server]} = Listener.connections(listener)
      %{sockets: sockets} = Listener.children(listener)
      Process.unlink(listener)
      Process.exit(server, :kill)
      refs = Enum.map([listener | sockets], &Process.monitor/1)

      ExUnit.CaptureLog.capture_log(fn ->
        Process.exit(listener, :kill)
        for ref <- refs, do: assert_receive({:DOWN, ^ref, :process, _, _}, 5_000)
      end)

      {listener2, ^port} = start_listener(handler: Echo, port: port, stateless_reset_key: key)
      on_exit(fn -> Listener.stop(listener2) end)

      started = System.monotonic_time(:millisecond)
      {:ok, stream2} = Connection.open_stream(conn, :bidirectional, active: false)
      _ = Stream.send(stream2, "anyone there?")

      assert_receive {:quic_connection_closed, ^conn, 0,
                      %TransportError{reason: :stateless_reset}},
                     5_000

      assert System.monotonic_time(:millisecond) - started < 3_000
      {:ok, stats} = Listener.stats(listener2)
      assert stats.stateless_resets >= 1
    end

    test "garbage short-header packets never get a reset as large as themselves" do
      {listener, port} = active_server(handler: Echo)
      {:ok, socket} = :gen_udp.open(0, [:binary, ip: @loopback, active: true])

      for size <- [1, 10, 20, 21, 22, 40, 100, 1200, 1500] do
        packet = <<0b01::2, :rand.uniform(63)::6>> <> :crypto.strong_rand_bytes(size - 1)
        :ok = :gen_udp.send(socket, @loopback, port, packet)

        receive do
          {:udp, ^socket, _, ^port, reply} ->
            assert byte_size(reply) < size
            assert byte_size(reply) >= 21
            # A short header: fixed bit set, long-header bit clear.
            <<0::1, 1::1, _::6, _::binary>> = reply
        after
          # Bounds a failure only for the sizes that must be answered.
          if(size > 21, do: 5_000, else: 200) ->
            assert size <= 21, "no stateless reset for a #{size}-byte packet"
        end
      end

      {:ok, %{stateless_resets: n}} = Listener.stats(listener)
      assert n >= 1
    end
  end
end
