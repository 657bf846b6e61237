defmodule Quichex.ResumptionTest do
  # Session resumption and 0-RTT, with the outcome told on both sides.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream, TransportError}

  @early [enable_early_data: true]

  defmodule Recorder do
    # Reports each request with the connection's state when its stream
    # opened (:handshaking means it came as 0-RTT data) and answers it.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = state) do
      send(test, {:server_conn, conn})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_early_data(outcome, %{test: test} = state) do
      send(test, {:handle_early_data, outcome})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_stream_open(stream, %{test: test}) do
      {:ok, %{connection: conn}} = Quichex.Stream.info(stream)
      {:ok, %{state: conn_state}} = Quichex.Connection.info(conn)
      {:continue, %{test: test, conn_state: conn_state, acc: []}}
    end

    @impl Quichex.Handler
    def handle_data(data, _stream, state), do: {:continue, %{state | acc: [state.acc | data]}}

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      request = IO.iodata_to_binary(state.acc)
      send(state.test, {:request, request, state.conn_state})
      :ok = Quichex.Stream.send(stream, "re:" <> request, fin: true)
      {:close, state}
    end
  end

  defp listener!(opts \\ []) do
    config_opts = Keyword.merge(@early, Keyword.get(opts, :config_opts, []))

    {listener, port} =
      start_listener(
        Keyword.merge(
          [handler: Recorder, handler_options: %{test: self()}],
          Keyword.put(opts, :config_opts, config_opts)
        )
      )

    on_exit(fn -> Listener.stop(listener) end)
    port
  end

  # A first connection, for a session ticket.
  defp ticket!(port) do
    conn = connect!(port, config_opts: @early)
    assert_receive {:quic_session_ticket, ^conn, ticket}, 5_000
    assert {:ok, ^ticket} = Connection.session(conn)
    :ok = Connection.close(conn)
    ticket
  end

  defp request(conn, body) do
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, body, fin: true)
    stream
  end

  defp reply(stream) do
    {:ok, data, true} = Stream.recv(stream, timeout: 5_000)
    data
  end

  test "tickets arrive; a resumed connection says so" do
    port = listener!()
    ticket = ticket!(port)
    assert is_binary(ticket) and byte_size(ticket) > 0

    conn = connect!(port, session: ticket, config_opts: @early)
    assert {:ok, %{resumed: true, early_data: :none}} = Connection.info(conn)
    fresh = connect!(port, config_opts: @early)
    assert {:ok, %{resumed: false}} = Connection.info(fresh)
  end

  test "0-RTT accepted: data sent before the handshake completes, told on both sides" do
    port = listener!()
    ticket = ticket!(port)
    assert_receive {:server_conn, _first}

    # Every datagram takes 100 ms each way: the server reads the 0-RTT
    # request long before the client's Finished reaches it.
    {:ok, _proxy, proxy_port} =
      Quichex.Test.FaultProxy.start_link(
        upstream: {{127, 0, 0, 1}, port},
        delay: 1.0,
        delay_ms: {100, 100}
      )

    {:ok, conn} =
      Connection.connect(
        host: {127, 0, 0, 1},
        server_name: "localhost",
        port: proxy_port,
        config: client_config(@early),
        session: ticket,
        early_data: true
      )

    # No wait_connected: the stream opens and sends at once, as 0-RTT.
    stream = request(conn, "early request")
    assert_receive {:request, "early request", :handshaking}, 5_000
    assert reply(stream) == "re:early request"
    assert_receive {:quic_early_data, ^conn, :accepted}, 5_000
    assert {:ok, %{early_data: :accepted, resumed: true}} = Connection.info(conn)

    assert_receive {:server_conn, server}, 5_000
    assert {:ok, %{early_data: :accepted}} = Connection.info(server)
    assert_receive {:handle_early_data, :accepted}, 5_000
  end

  test "0-RTT rejected by a server whose ticket key changed: told on both sides, data still delivered" do
    key_a = :binary.copy(<<1>>, 48)
    key_b = :binary.copy(<<2>>, 48)
    port_a = listener!(config_opts: [ticket_key: key_a])
    ticket = ticket!(port_a)
    assert_receive {:server_conn, _first}
    port_b = listener!(config_opts: [ticket_key: key_b])

    {:ok, conn} =
      Connection.connect(
        host: "localhost",
        port: port_b,
        config: client_config(@early),
        session: ticket,
        early_data: true
      )

    stream = request(conn, "maybe early")
    assert_receive {:quic_early_data, ^conn, {:rejected, reason}}, 5_000
    assert is_atom(reason)
    # The 0-RTT data went again after the handshake.
    assert_receive {:request, "maybe early", :established}, 10_000
    assert reply(stream) == "re:maybe early"
    assert {:ok, %{early_data: :rejected, resumed: false}} = Connection.info(conn)

    assert_receive {:server_conn, server}, 5_000
    assert {:ok, %{early_data: :rejected}} = Connection.info(server)
    assert_receive {:handle_early_data, {:rejected, _reason}}, 5_000
  end

  test "a listener may refuse early data per connection" do
    port = listener!(accept_early_data: fn {_ip, _port} -> false end)
    ticket = ticket!(port)

    {:ok, conn} =
      Connection.connect(
        host: "localhost",
        port: port,
        config: client_config(@early),
        session: ticket,
        early_data: true
      )

    stream = request(conn, "refused early")
    assert_receive {:quic_early_data, ^conn, {:rejected, _reason}}, 5_000
    assert_receive {:request, "refused early", :established}, 10_000
    assert reply(stream) == "re:refused early"
  end

  test "early_data without a ticket is a normal handshake" do
    port = listener!()

    {:ok, conn} =
      Connection.connect(
        host: "localhost",
        port: port,
        config: client_config(@early),
        early_data: true
      )

    stream = request(conn, "late")
    assert_receive {:request, "late", :established}, 5_000
    assert reply(stream) == "re:late"
    assert {:ok, %{early_data: :none, resumed: false}} = Connection.info(conn)
    refute_received {:quic_early_data, ^conn, _}
  end

  test "errors: no ticket yet, a session that is no ticket" do
    port = listener!()
    conn = connect!(port)
    assert_receive {:server_conn, server}
    assert {:error, :no_ticket} = Connection.session(server)

    assert {:error, %TransportError{reason: :invalid_session}} =
             Connection.connect(
               host: "localhost",
               port: port,
               config: client_config(),
               session: "not a ticket"
             )

    assert_raise ArgumentError, ~r/:session/, fn ->
      Connection.connect(host: "localhost", port: port, config: client_config(), session: 42)
    end

    assert Connection.is_established?(conn)
  end
end
