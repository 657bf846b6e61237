defmodule Quichex.AbuseTest do
  # A listener under attack: spoofed first flights that never answer (the
  # 3x anti-amplification limit), Initial floods (Retry under load, the
  # pending-handshake cap), undecryptable Initials (no process for them),
  # and mutual TLS that refuses clients without a good certificate.
  #
  # Not async: the floods would slow every other test down.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream, TransportError}

  @loopback {127, 0, 0, 1}

  defmodule Echo do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = state) do
      send(test, {:handler_connection, conn})
      {:continue, state}
    end

    def handle_connection(_conn, state), do: {:continue, state}

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      :ok = Quichex.Stream.send(stream, data)
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      :ok = Quichex.Stream.close(stream)
      {:close, state}
    end
  end

  defp listener!(opts) do
    {listener, port} = start_listener(opts)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  defp stats(listener) do
    {:ok, stats} = Listener.stats(listener)
    stats
  end

  defp echo!(port, opts \\ []) do
    conn = connect!(port, opts)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "ping", fin: true)
    assert read_all(stream, "") == "ping"
    :ok = Connection.close(conn)
  end

  defp read_all(stream, acc) do
    case Stream.recv(stream, timeout: 10_000) do
      {:ok, data, true} -> acc <> data
      {:ok, data, false} -> read_all(stream, acc <> data)
    end
  end

  # Everything that arrived on the sockets, per socket, once nothing more
  # came for `quiet` ms.
  defp drain(acc, quiet) do
    receive do
      {:udp, socket, _ip, _port, data} ->
        drain(Map.update(acc, socket, byte_size(data), &(&1 + byte_size(data))), quiet)
    after
      quiet -> acc
    end
  end

  describe "anti-amplification" do
    test "a spoofed first flight that never answers gets at most 3x back, for 2,000 sources" do
      # The default handshake timeout (5 s) leaves time for PTOs: quiche
      # resends its first flight until the budget binds.
      {listener, port} =
        listener!(
          handler: Echo,
          retry: :never,
          max_pending_handshakes: 2_001,
          max_connections: 2_001
        )

      # One first: its stats show the budget binding.
      [flight] = first_flights(1, {@loopback, port})
      {:ok, probe} = :gen_udp.open(0, [:binary, ip: @loopback, active: false])
      for datagram <- flight, do: :ok = :gen_udp.send(probe, @loopback, port, datagram)
      eventually(fn -> match?({:ok, [_]}, Listener.connections(listener)) end)
      {:ok, [conn]} = Listener.connections(listener)

      eventually(
        fn -> match?({:ok, %{amplification_limited: n}} when n > 0, Connection.stats(conn)) end,
        10_000
      )

      sent =
        for {flight, i} <- Enum.with_index(first_flights(2_000, {@loopback, port}), 1),
            into: %{} do
          {:ok, socket} = :gen_udp.open(0, [:binary, ip: @loopback, active: true])
          for datagram <- flight, do: :ok = :gen_udp.send(socket, @loopback, port, datagram)
          # Paced, so the listener's socket buffer drops none.
          if rem(i, 200) == 0, do: eventually(fn -> stats(listener).accepted >= i end, 30_000)
          {socket, flight |> Enum.map(&byte_size/1) |> Enum.sum()}
        end

      # Every one of them gave up (handshake timeout) ...
      eventually(fn -> stats(listener).connections == 0 end, 60_000)
      # ... and what they sent has arrived.
      received = drain(%{}, 300)

      for {socket, out} <- sent do
        back = Map.get(received, socket, 0)
        assert back > 0, "a source got nothing back (the test would prove nothing)"
        assert back <= 3 * out, "#{back} bytes sent for #{out} received"
        :gen_udp.close(socket)
      end

      assert stats(listener).accepted == 2_001
      # The limit was reached, not just respected by a small first flight.
      assert Enum.sum(Map.values(received)) > 2 * Enum.sum(Map.values(sent))
      :gen_udp.close(probe)
    end
  end

  describe "Initial floods" do
    test "5,000 undecryptable Initials start no process" do
      {listener, port} = listener!(handler: Echo, retry: :never)
      %{sockets: socket_pids, connections: conn_sup} = Listener.children(listener)
      [[datagram | _]] = first_flights(1, {@loopback, port})
      <<first, version::32, dcid_len, _dcid::binary-size(dcid_len), rest::binary>> = datagram

      for pid <- [conn_sup | socket_pids], do: :erlang.trace(pid, true, [:procs])

      {:ok, socket} = :gen_udp.open(0, [:binary, ip: @loopback])

      for i <- 1..5_000 do
        # A well-formed Initial whose keys (from the DCID) do not decrypt it.
        dcid = :crypto.strong_rand_bytes(dcid_len)

        :ok =
          :gen_udp.send(socket, @loopback, port, [first, <<version::32, dcid_len>>, dcid, rest])

        # Paced, so the socket buffer never drops any.
        if rem(i, 200) == 0, do: eventually(fn -> stats(listener).invalid_initial >= i end)
      end

      eventually(fn -> stats(listener).invalid_initial == 5_000 end)
      for pid <- [conn_sup | socket_pids], do: :erlang.trace(pid, false, [:procs])

      assert %{accepted: 0, connections: 0, pending_handshakes: 0} = stats(listener)
      assert %{active: 0} = DynamicSupervisor.count_children(conn_sup)
      refute_received {:trace, _, :spawn, _, _}
      refute_received {:trace, _, :spawned, _, _}
      :gen_udp.close(socket)

      # The listener still serves real clients.
      echo!(port)
    end

    test "under load, 20,000 spoofed Initials get Retry; pending handshakes stay at n; real clients still connect" do
      n = 20

      {listener, port} =
        listener!(
          handler: Echo,
          retry: {:under_load, n},
          handshake_timeout: 2_000,
          max_pending_handshakes: 5_000
        )

      flights = first_flights(20_000, {@loopback, port})

      # A real client connects and echoes again and again during the flood.
      client =
        Task.async(fn ->
          Elixir.Stream.repeatedly(fn ->
            echo!(port)
            receive do: (:stop -> :stop), after: (0 -> :again)
          end)
          |> Enum.take_while(&(&1 == :again))
          |> length()
        end)

      # Watches the pending count throughout.
      watcher =
        Task.async(fn ->
          Elixir.Stream.repeatedly(fn ->
            receive do: (:stop -> :stop), after: (5 -> stats(listener).pending_handshakes)
          end)
          |> Enum.take_while(&(&1 != :stop))
          |> Enum.max(fn -> 0 end)
        end)

      {:ok, socket} = :gen_udp.open(0, [:binary, ip: @loopback, active: false])

      flights
      |> Enum.with_index(1)
      |> Enum.each(fn {[datagram | _], i} ->
        :ok = :gen_udp.send(socket, @loopback, port, datagram)
        # Paced, so the listener's socket buffer does not drop them.
        if rem(i, 500) == 0,
          do: eventually(fn -> stats(listener).datagrams_received >= i end, 30_000)
      end)

      send(client.pid, :stop)
      rounds = Task.await(client, 60_000)

      # The pacing above counts the real client's datagrams too, so the last
      # few hundred spoofed Initials may still be queued: wait until every
      # one is accounted for (answered, accepted or dropped by the kernel)
      # before reading the final figures.
      eventually(
        fn ->
          stats = stats(listener)
          stats.retry_sent + stats.accepted + kernel_drops(port) >= 20_000
        end,
        30_000
      )

      send(watcher.pid, :stop)
      most_pending = Task.await(watcher, 10_000)

      stats = stats(listener)
      assert rounds >= 1
      # Spoofed sources never answer their Retry: at most n of them hold a
      # handshake (the real client's validated one may add one more).
      assert most_pending <= n + 1
      # Every Initial that reached the listener was answered with a Retry or
      # accepted (on a busy machine the kernel may drop some from a full
      # socket buffer before any process sees them: /proc/net/udp counts
      # those); nearly all got a Retry (slots free up only as spoofed
      # handshakes time out).
      assert stats.retry_sent + stats.accepted + kernel_drops(port) >= 20_000
      assert stats.accepted <= 2_000
      :gen_udp.close(socket)

      # The handshake timeout reclaims them.
      eventually(fn -> stats(listener).pending_handshakes == 0 end, 10_000)
      echo!(port)
    end

    test "max_pending_handshakes caps handshakes whatever :retry says" do
      {listener, port} =
        listener!(
          handler: Echo,
          retry: :never,
          handshake_timeout: 2_000,
          max_pending_handshakes: 10
        )

      {:ok, socket} = :gen_udp.open(0, [:binary, ip: @loopback, active: false])

      for [datagram | _] <- first_flights(50, {@loopback, port}),
          do: :ok = :gen_udp.send(socket, @loopback, port, datagram)

      eventually(fn -> stats(listener).refused >= 40 end)
      assert %{accepted: 10, retry_sent: 0} = stats(listener)
      assert stats(listener).pending_handshakes <= 10
      :gen_udp.close(socket)
    end

    test "bad :retry, :client_cert and :max_pending_handshakes raise ArgumentError naming them" do
      for {opt, bad} <- [
            retry: :sometimes,
            retry: {:under_load, -1},
            client_cert: :maybe,
            max_pending_handshakes: 0
          ] do
        assert_raise ArgumentError, ~r/#{opt}/, fn ->
          Listener.start_link(config: server_config(), handler: Echo, port: 0, "#{opt}": bad)
        end
      end
    end
  end

  describe "mutual TLS" do
    defp mtls_listener(client_cert) do
      opts = [
        config_opts: [verify_peer: true, load_verify_locations_from_file: certs().ca],
        handler: Echo,
        handler_options: %{test: self()}
      ]

      opts = if client_cert, do: Keyword.put(opts, :client_cert, client_cert), else: opts
      listener!(opts)
    end

    defp mtls_connect(port, cert) do
      config_opts =
        case cert do
          :trusted ->
            [
              load_cert_chain_from_pem_file: certs().client_cert,
              load_priv_key_from_pem_file: certs().client_key
            ]

          :untrusted ->
            [
              load_cert_chain_from_pem_file: certs().rogue_client_cert,
              load_priv_key_from_pem_file: certs().rogue_client_key
            ]

          :none ->
            []
        end

      {:ok, conn} =
        Connection.connect(host: "localhost", port: port, config: client_config(config_opts))

      conn
    end

    defp assert_accepted(conn, cert) do
      assert_receive {:quic_connected, ^conn}, 5_000
      assert_receive {:handler_connection, server}, 5_000
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      :ok = Stream.send(stream, "hi", fin: true)
      assert read_all(stream, "") == "hi"

      # Both sides see the other's certificate chain.
      {:ok, client_info} = Connection.info(conn)
      {:ok, server_info} = Connection.info(server)
      assert [server_leaf | _] = client_info.peer_cert_chain
      assert server_leaf == client_info.peer_cert

      case cert do
        :trusted ->
          assert [client_leaf | _] = server_info.peer_cert_chain
          assert client_leaf == pem_der(certs().client_cert)

        :none ->
          assert server_info.peer_cert == nil
          assert server_info.peer_cert_chain == []
      end
    end

    defp assert_refused(conn, code) do
      # The client usually finished its side of the handshake first.
      receive do
        {:quic_connection_closed, ^conn, ^code, %TransportError{reason: {:transport, ^code, _}}} ->
          :ok

        {:quic_connection_error, ^conn, %TransportError{reason: {:transport, ^code, _}}} ->
          :ok
      after
        5_000 -> flunk("the client was not refused with 0x#{Integer.to_string(code, 16)}")
      end

      refute_received {:handler_connection, _}
    end

    defp assert_rejected_by_tls(conn) do
      # An untrusted certificate fails BoringSSL's verification: a TLS alert.
      receive do
        {:quic_connection_error, ^conn, %TransportError{reason: {:transport, code, _}}} ->
          assert code in 0x100..0x1FF

        {:quic_connection_closed, ^conn, code, %TransportError{}} ->
          assert code in 0x100..0x1FF
      after
        5_000 -> flunk("the untrusted client was not refused")
      end

      refute_received {:handler_connection, _}
    end

    defp pem_der(path) do
      [{:Certificate, der, _}] = path |> File.read!() |> :public_key.pem_decode()
      der
    end

    test "required (verify_peer: true): trusted in; untrusted and none refused" do
      {_listener, port} = mtls_listener(nil)
      assert_accepted(mtls_connect(port, :trusted), :trusted)
      assert_rejected_by_tls(mtls_connect(port, :untrusted))
      # certificate_required (TLS alert 116).
      assert_refused(mtls_connect(port, :none), 0x174)
    end

    test "optional: trusted and none in; untrusted refused" do
      {_listener, port} = mtls_listener(:optional)
      assert_accepted(mtls_connect(port, :trusted), :trusted)
      assert_accepted(mtls_connect(port, :none), :none)
      assert_rejected_by_tls(mtls_connect(port, :untrusted))
    end

    test "none: no certificate asked for" do
      {_listener, port} = mtls_listener(:none)
      assert_accepted(mtls_connect(port, :none), :none)
    end
  end

  # Datagrams the kernel dropped on the UDP sockets bound to `port` (the
  # last column of /proc/net/udp), 0 where that file does not exist.
  defp kernel_drops(port) do
    hex = ":" <> String.pad_leading(Integer.to_string(port, 16), 4, "0")

    case File.read("/proc/net/udp") do
      {:ok, table} ->
        table
        |> String.split("\n", trim: true)
        |> tl()
        |> Enum.map(&String.split/1)
        |> Enum.filter(fn [_sl, local | _] -> String.ends_with?(local, hex) end)
        |> Enum.map(&String.to_integer(List.last(&1)))
        |> Enum.sum()

      {:error, _} ->
        0
    end
  end
end
