defmodule Quichex.PlanTest do
  # The user's plan (../shared/PLAN.md, "Public API Design"), section by
  # section, pasted as written: only file names, host and port are ours, and
  # a stream pid stands where the plan has a stream id.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  defmodule MyApp.ConnectionHandler do
    @behaviour Quichex.ConnectionHandler

    def handle_connection(conn_pid, peer_address) do
      # Handle the connection
      {:ok, _pid} = Task.start(fn -> handle_conn(conn_pid, peer_address) end)
      :ok
    end

    defp handle_conn(conn_pid, peer_address) do
      # Take the connection, then report it to the test.
      :ok = Quichex.Connection.controlling_process(conn_pid, self())
      [{:test, test}] = :ets.lookup(:quichex_plan_test, :test)
      send(test, {:handled, conn_pid, peer_address})

      receive do
        {:quic_stream_opened, ^conn_pid, stream, :bidirectional} ->
          {:ok, data} = read(conn_pid, stream, [])
          :ok = Quichex.Connection.stream_send(conn_pid, stream, String.upcase(data), fin: true)
      after
        5_000 -> :ok
      end
    end

    defp read(conn, stream, acc) do
      receive do
        {:quic_stream, ^conn, ^stream, data} -> read(conn, stream, [acc | data])
        {:quic_stream_fin, ^conn, ^stream} -> {:ok, IO.iodata_to_binary(acc)}
      after
        5_000 -> {:error, :timeout}
      end
    end
  end

  setup_all do
    :ets.new(:quichex_plan_test, [:named_table, :public])
    :ok
  end

  defp configuration do
    c = certs()

    # Builder pattern for ergonomic configuration
    Quichex.Config.new()
    |> Quichex.Config.set_application_protos(["myproto"])
    |> Quichex.Config.set_initial_max_streams_bidi(100)
    |> Quichex.Config.set_initial_max_streams_uni(100)
    |> Quichex.Config.set_initial_max_data(10_000_000)
    |> Quichex.Config.set_initial_max_stream_data_bidi_local(1_000_000)
    |> Quichex.Config.set_initial_max_stream_data_bidi_remote(1_000_000)
    |> Quichex.Config.set_max_idle_timeout(30_000)
    |> Quichex.Config.set_cc_algorithm(:cubic)
    # Server-specific
    |> Quichex.Config.load_cert_chain_from_pem_file(c.cert)
    |> Quichex.Config.load_priv_key_from_pem_file(c.key)
    # Client-specific
    |> Quichex.Config.verify_peer(true)
    |> Quichex.Config.load_verify_locations_from_file(c.ca)
  end

  test "Configuration: every setter, and every congestion control the plan names" do
    config = configuration()
    assert :ok = Quichex.Config.check(config, :server)
    assert :ok = Quichex.Config.check(config, :client)

    for cc <- [:cubic, :reno, :bbr, :bbr2] do
      assert :ok = config |> Quichex.Config.set_cc_algorithm(cc) |> Quichex.Config.check()
    end

    config = Quichex.Config.grease(config, false)
    assert Quichex.Config.get(config, :grease) == false
  end

  test "Client Connection, Connection Management" do
    server_config = configuration()

    {:ok, listener_pid} =
      Quichex.Listener.start_link(port: 0, config: server_config, active: true)

    on_exit(fn -> Quichex.Listener.stop(listener_pid) end)
    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener_pid)
    config = configuration()

    # Start a client connection
    {:ok, conn_pid} =
      Quichex.Connection.connect(
        host: "localhost",
        port: port,
        config: config,
        # Optional:
        # random port
        local_port: 0,
        # like :gen_tcp/:gen_udp active mode
        active: true
      )

    # Wait for handshake completion
    case Quichex.Connection.wait_connected(conn_pid, timeout: 5000) do
      :ok -> :ok
      {:error, reason} -> flunk("Failed: #{inspect(reason)}")
    end

    # Alternative: async notifications
    receive do
      {:quic_connected, ^conn_pid} ->
        :ok

      {:quic_connection_error, ^conn_pid, reason} ->
        flunk("Connection failed: #{inspect(reason)}")
    end

    # Get connection stats
    {:ok, stats} = Quichex.Connection.stats(conn_pid)
    assert %{rtt: _, cwnd: _, bytes_sent: _, bytes_received: _} = stats

    # Check connection state
    true = Quichex.Connection.is_established?(conn_pid)
    false = Quichex.Connection.is_closed?(conn_pid)

    # Get connection info
    {:ok, info} = Quichex.Connection.info(conn_pid)

    assert %{
             local_address: {{_, _, _, _}, _},
             peer_address: {{127, 0, 0, 1}, ^port},
             alpn: "myproto",
             is_server: false,
             is_established: true
           } = info

    # Close connection gracefully
    :ok = Quichex.Connection.close(conn_pid, error_code: 0, reason: "done")
    true = Quichex.Connection.is_draining?(conn_pid) or Quichex.Connection.is_closed?(conn_pid)
    assert_receive {:quic_connection_closed, ^conn_pid, 0, :local}
  end

  test "Stream Operations" do
    {listener, port} = start_listener(config_opts: [application_protos: ["myproto"]])
    on_exit(fn -> Quichex.Listener.stop(listener) end)
    conn_pid = connect!(port, config_opts: [application_protos: ["myproto"]])
    server = accept!(listener)

    # Open a stream
    {:ok, stream_id} = Quichex.Connection.open_stream(conn_pid, :bidirectional)
    # or
    {:ok, uni} = Quichex.Connection.open_stream(conn_pid, :unidirectional)
    assert {:ok, %{direction: :unidirectional}} = Quichex.Stream.info(uni)

    # Send data on stream
    :ok = Quichex.Connection.stream_send(conn_pid, stream_id, "Hello", fin: false)
    :ok = Quichex.Connection.stream_send(conn_pid, stream_id, " QUIC!", fin: true)

    assert_receive {:quic_stream_opened, ^server, peer, :bidirectional}
    assert {:ok, "Hello QUIC!"} == collect(server, peer, [])
    :ok = Quichex.Stream.send(peer, "back", fin: true)

    # Active mode (default): receive messages
    receive do
      {:quic_stream, ^conn_pid, ^stream_id, data} -> assert data == "back"
      {:quic_stream_fin, ^conn_pid, ^stream_id} -> flunk("FIN before the data")
      {:quic_stream_reset, ^conn_pid, ^stream_id, error_code} -> flunk("reset #{error_code}")
    after
      5_000 -> flunk("no data")
    end

    assert_receive {:quic_stream_fin, ^conn_pid, ^stream_id}

    # Passive mode: explicit receive
    {:ok, passive} = Quichex.Connection.open_stream(conn_pid, :bidirectional, active: false)
    :ok = Quichex.Connection.stream_send(conn_pid, passive, "ping", fin: false)
    assert_receive {:quic_stream_opened, ^server, peer2, :bidirectional}
    assert_receive {:quic_stream, ^server, ^peer2, "ping"}
    :ok = Quichex.Stream.send(peer2, "pong")
    eventually(fn -> match?({:ok, [^passive]}, Quichex.Connection.readable_streams(conn_pid)) end)
    {:ok, "pong", false} = Quichex.Connection.stream_recv(conn_pid, passive)

    # Get readable/writable streams
    {:ok, readable_streams} = Quichex.Connection.readable_streams(conn_pid)
    {:ok, writable_streams} = Quichex.Connection.writable_streams(conn_pid)
    assert readable_streams == []
    assert passive in writable_streams and uni in writable_streams
    refute stream_id in writable_streams

    # Close/reset stream
    :ok = Quichex.Connection.stream_shutdown(conn_pid, passive, :read, error_code: 0)
    :ok = Quichex.Connection.stream_shutdown(conn_pid, passive, :write, error_code: 0)
    :ok = Quichex.Connection.stream_shutdown(conn_pid, uni, :both, error_code: 0)
    assert_receive {:quic_stream_reset, ^server, ^peer2, 0}
    assert_receive {:quic_stream_stopped, ^server, ^peer2, 0}
  end

  defp collect(conn, stream, acc) do
    receive do
      {:quic_stream, ^conn, ^stream, data} -> collect(conn, stream, [acc | data])
      {:quic_stream_fin, ^conn, ^stream} -> {:ok, IO.iodata_to_binary(acc)}
    after
      5_000 -> {:error, :timeout}
    end
  end

  test "Server Listener, active mode" do
    server_config = configuration()

    # Start a listener
    {:ok, listener_pid} =
      Quichex.Listener.start_link(
        port: 0,
        config: server_config,
        # send {:quic_connection, ...} messages to parent
        active: true
      )

    on_exit(fn -> Quichex.Listener.stop(listener_pid) end)
    {:ok, {_, port}} = Quichex.Listener.sockname(listener_pid)
    client = connect!(port, config: configuration())

    # Accept connections in active mode
    receive do
      {:quic_connection, ^listener_pid, conn_pid, peer_address} ->
        {:ok, %{local_address: ^peer_address}} = Quichex.Connection.info(client)
        {:ok, conns} = Quichex.Listener.connections(listener_pid)
        assert conns == [conn_pid]
    after
      5_000 -> flunk("no connection")
    end
  end

  test "Server Listener, a connection handler callback module" do
    :ets.insert(:quichex_plan_test, {:test, self()})
    server_config = configuration()

    # Or use a connection handler callback module
    {:ok, listener_pid} =
      Quichex.Listener.start_link(
        port: 0,
        config: server_config,
        # implements behaviour
        connection_handler: MyApp.ConnectionHandler
      )

    on_exit(fn -> Quichex.Listener.stop(listener_pid) end)
    {:ok, {_, port}} = Quichex.Listener.sockname(listener_pid)
    client = connect!(port, config: configuration())
    assert_receive {:handled, server_conn, peer}, 5_000
    {:ok, %{local_address: ^peer}} = Quichex.Connection.info(client)
    assert {:ok, [^server_conn]} = Quichex.Listener.connections(listener_pid)

    {:ok, stream} = Quichex.Connection.open_stream(client, :bidirectional, active: false)
    :ok = Quichex.Stream.send(stream, "shout", fin: true)
    assert {:ok, "SHOUT", true} = Quichex.Stream.recv(stream, timeout: 5_000)
  end

  test "Datagrams" do
    # Enable datagrams in config
    config =
      configuration()
      |> Quichex.Config.enable_dgram(true, recv_queue_len: 1000, send_queue_len: 1000)

    {:ok, listener_pid} = Quichex.Listener.start_link(port: 0, config: config, active: true)
    on_exit(fn -> Quichex.Listener.stop(listener_pid) end)
    {:ok, {_, port}} = Quichex.Listener.sockname(listener_pid)
    {:ok, conn_pid} = Quichex.Connection.connect(host: "localhost", port: port, config: config)
    server = accept!(listener_pid)

    # Send datagram
    :ok = Quichex.Connection.dgram_send(conn_pid, "unreliable data")

    # Receive datagram (active mode)
    receive do
      {:quic_dgram, ^server, data} -> assert data == "unreliable data"
    after
      5_000 -> flunk("no datagram")
    end
  end
end
