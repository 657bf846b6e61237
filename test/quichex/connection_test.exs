defmodule Quichex.ConnectionTest do
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{ApplicationError, Connection, Listener, TransportError}

  setup do
    {listener, port} = start_listener()
    on_exit(fn -> Listener.stop(listener) end)
    %{listener: listener, port: port}
  end

  describe "handshake" do
    test "connects, reports stats and info, and closes with a code the peer sees", %{
      listener: listener,
      port: port
    } do
      conn = connect!(port)
      assert_receive {:quic_connected, ^conn}
      server = accept!(listener)
      assert_receive {:quic_connected, ^server}

      assert Connection.is_established?(conn)
      refute Connection.is_closed?(conn)
      refute Connection.is_draining?(conn)

      {:ok, stats} = Connection.stats(conn)
      assert stats.rtt > 0
      assert stats.bytes_sent > 0 and stats.bytes_received > 0
      assert stats.packets_sent > 0 and stats.packets_received > 0
      assert stats.cwnd > 0

      {:ok, info} = Connection.info(conn)
      assert info.alpn == alpn()
      assert info.server_name == "localhost"
      assert info.is_server == false
      assert info.is_established
      assert info.peer_address == {{127, 0, 0, 1}, port}
      assert {{127, 0, 0, 1}, local_port} = info.local_address
      assert local_port > 0
      assert is_binary(info.peer_cert)

      {:ok, server_info} = Connection.info(server)
      assert server_info.is_server
      assert server_info.alpn == alpn()
      assert server_info.peer_address == info.local_address

      assert :ok = Connection.close(conn, error_code: 42, reason: "done here")
      assert_receive {:quic_connection_closed, ^conn, 42, :local}

      assert_receive {:quic_connection_closed, ^server, 42,
                      %ApplicationError{code: 42, reason: :connection_close, phrase: "done here"}},
                     2_000

      eventually(fn -> not Process.alive?(conn) and not Process.alive?(server) end)
    end

    test "IPv6 loopback" do
      {listener, port} = start_listener(ip: {0, 0, 0, 0, 0, 0, 0, 1})
      conn = connect!(port, host: "::1")
      {:ok, info} = Connection.info(conn)
      assert info.peer_address == {{0, 0, 0, 0, 0, 0, 0, 1}, port}
      assert info.server_name == nil
      _ = accept!(listener)
      Listener.stop(listener)
    end

    test "calls that need an established connection wait for the handshake", %{port: port} do
      {:ok, conn} = Connection.connect(host: "localhost", port: port, config: client_config())
      # Issued right away, answered once the handshake completes.
      assert {:ok, stream} = Connection.open_stream(conn, :bidirectional)
      assert Connection.is_established?(conn)
      assert {:ok, %{id: 0, initiator: :local}} = Quichex.Stream.info(stream)
    end

    test "passive connections send no messages", %{port: port} do
      conn = connect!(port, active: false)
      refute_receive {:quic_connected, ^conn}, 100
      :ok = Connection.close(conn)
      refute_receive {:quic_connection_closed, ^conn, _, _}, 100
    end
  end

  describe "failures" do
    test "wrong ALPN fails the handshake with a TLS alert", %{port: port} do
      {:ok, conn} =
        Connection.connect(
          host: "localhost",
          port: port,
          config: client_config(application_protos: ["other"])
        )

      assert {:error, %TransportError{reason: {:transport, code, _}}} =
               Connection.wait_connected(conn, timeout: 5_000)

      # 0x178: TLS alert no_application_protocol
      assert code == 0x178
      assert_receive {:quic_connection_error, ^conn, %TransportError{}}
      eventually(fn -> not Process.alive?(conn) end)
    end

    test "an untrusted certificate with verify_peer fails", %{port: port} do
      config = client_config(load_verify_locations_from_file: certs().other_ca, verify_peer: true)
      {:ok, conn} = Connection.connect(host: "localhost", port: port, config: config)

      assert {:error, %TransportError{reason: {:transport, code, _}}} =
               Connection.wait_connected(conn)

      assert code in 0x100..0x1FF
    end

    test "a certificate for another name fails verification", %{port: port} do
      {:ok, conn} =
        Connection.connect(
          host: "127.0.0.1",
          port: port,
          config: client_config(),
          server_name: "example.com"
        )

      assert {:error, %TransportError{}} = Connection.wait_connected(conn)
    end

    test "nothing listening: the handshake times out within the timeout" do
      {:ok, sock} = :gen_udp.open(0, ip: {127, 0, 0, 1})
      {:ok, dead_port} = :inet.port(sock)
      started = System.monotonic_time(:millisecond)

      {:ok, conn} =
        Connection.connect(
          host: "127.0.0.1",
          port: dead_port,
          config: client_config(),
          handshake_timeout: 300
        )

      assert {:error, %TransportError{reason: :handshake_timeout}} =
               Connection.wait_connected(conn, timeout: 5_000)

      assert System.monotonic_time(:millisecond) - started < 2_000
      assert_receive {:quic_connection_error, ^conn, %TransportError{reason: :handshake_timeout}}
      :gen_udp.close(sock)
    end

    test "the idle timeout closes both sides" do
      {listener, port} = start_listener(config_opts: [max_idle_timeout: 300])
      conn = connect!(port, config_opts: [max_idle_timeout: 300])
      server = accept!(listener)

      assert_receive {:quic_connection_closed, ^conn, 0, %TransportError{reason: :idle_timeout}},
                     3_000

      assert_receive {:quic_connection_closed, ^server, 0,
                      %TransportError{reason: :idle_timeout}},
                     3_000

      Listener.stop(listener)
    end

    test "an unresolvable host is an error" do
      assert {:error, %TransportError{reason: {:resolve, _}}} =
               Connection.connect(
                 host: "no-such-host.invalid",
                 port: 443,
                 config: client_config()
               )
    end

    test "bad options raise ArgumentError naming them" do
      assert_raise ArgumentError, ~r/:port/, fn ->
        Connection.connect(host: "localhost", port: 0, config: client_config())
      end

      assert_raise ArgumentError, ~r/:config/, fn ->
        Connection.connect(host: "localhost", port: 1)
      end

      assert_raise ArgumentError, ~r/:bogus/, fn ->
        Connection.connect(host: "x", port: 1, config: client_config(), bogus: 1)
      end

      assert_raise ArgumentError, ~r/:handshake_timeout/, fn ->
        Connection.connect(host: "x", port: 1, config: client_config(), handshake_timeout: -1)
      end

      assert_raise ArgumentError, ~r/application_protos/, fn ->
        Connection.connect(host: "x", port: 1, config: Quichex.Config.new())
      end
    end
  end

  describe "lifecycle" do
    test "calls on a closed connection return promptly", %{port: port} do
      conn = connect!(port)
      :ok = Connection.close(conn)
      eventually(fn -> not Process.alive?(conn) end)

      {time, results} =
        :timer.tc(fn ->
          [
            Connection.close(conn),
            Connection.stats(conn),
            Connection.info(conn),
            Connection.wait_connected(conn),
            Connection.open_stream(conn, :bidirectional)
          ]
        end)

      assert results == [
               :ok,
               {:error, :closed},
               {:error, :closed},
               {:error, :closed},
               {:error, :closed}
             ]

      assert Connection.is_closed?(conn)
      # Far below the 5 s call timeouts: nothing waited for a dead process.
      assert time < 2_000_000
    end

    test "killing the controlling process closes the connection", %{
      listener: listener,
      port: port
    } do
      test = self()

      owner =
        spawn(fn ->
          conn = connect!(port)
          send(test, {:conn, conn})
          Process.sleep(:infinity)
        end)

      assert_receive {:conn, conn}, 5_000
      server = accept!(listener)
      ref = Process.monitor(conn)
      Process.exit(owner, :kill)
      assert_receive {:DOWN, ^ref, :process, ^conn, :normal}, 5_000
      assert_receive {:quic_connection_closed, ^server, 0, %ApplicationError{code: 0}}, 5_000
    end

    test "controlling_process hands the connection over", %{port: port} do
      conn = connect!(port)
      assert_receive {:quic_connected, ^conn}
      test = self()

      forward = fn forward ->
        receive do: (msg -> send(test, {:other_got, msg}) && forward.(forward))
      end

      other = spawn(fn -> forward.(forward) end)
      assert :ok = Connection.controlling_process(conn, other)
      assert {:error, :not_owner} = Connection.controlling_process(conn, self())
      :ok = Connection.close(conn, error_code: 3)
      assert_receive {:other_got, {:quic_connection_closed, ^conn, 3, :local}}
    end

    test "telemetry spans and the handshake event", %{port: port} do
      test = self()
      id = {__MODULE__, make_ref()}

      :telemetry.attach_many(
        id,
        [
          [:quichex, :connection, :start],
          [:quichex, :connection, :handshake],
          [:quichex, :connection, :stop]
        ],
        fn event, measurements, metadata, _ ->
          if metadata.role == :client, do: send(test, {:telemetry, event, measurements, metadata})
        end,
        nil
      )

      on_exit(fn -> :telemetry.detach(id) end)
      conn = connect!(port)

      assert_receive {:telemetry, [:quichex, :connection, :start], %{system_time: _},
                      %{connection: ^conn}}

      assert_receive {:telemetry, [:quichex, :connection, :handshake], %{duration: d},
                      %{connection: ^conn, alpn: "quichex-test"}}

      assert d > 0
      :ok = Connection.close(conn, error_code: 9)

      assert_receive {:telemetry, [:quichex, :connection, :stop],
                      %{bytes_sent: sent, duration: _}, %{connection: ^conn, reason: :local}},
                     5_000

      assert sent > 0
    end
  end
end
