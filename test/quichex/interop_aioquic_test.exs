defmodule Quichex.InteropAioquicTest do
  # Interop with aioquic, a foreign QUIC implementation, through the peers in
  # integration/peers (run from the venv that `make deps-python` creates).
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers
  import Quichex.Test.Interop

  alias Quichex.{ApplicationError, Connection, Listener, TransportError}

  @moduletag :interop

  defmodule Echo do
    # Bidi: echo each chunk on the same stream as it arrives, and FIN (an
    # empty one, written on its own by close/1) on the peer's FIN. Uni:
    # collect until FIN, then send it all back on a new unidirectional
    # stream of ours.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_stream_open(stream, _opts) do
      {:ok, %{direction: dir, connection: conn}} = Quichex.Stream.info(stream)
      {:continue, %{direction: dir, conn: conn, acc: []}}
    end

    @impl Quichex.Handler
    def handle_data(data, stream, %{direction: :bidirectional} = state) do
      :ok = Quichex.Stream.send(stream, data, timeout: 10_000)
      {:continue, state}
    end

    def handle_data(data, _stream, %{direction: :unidirectional} = state) do
      {:continue, %{state | acc: [state.acc | data]}}
    end

    @impl Quichex.Handler
    def handle_fin(stream, %{direction: :bidirectional} = state) do
      :ok = Quichex.Stream.close(stream, timeout: 10_000)
      {:close, state}
    end

    def handle_fin(_stream, %{direction: :unidirectional} = state) do
      {:ok, out} = Connection.open_stream(state.conn, :unidirectional, active: false)
      :ok = Quichex.Stream.send(out, state.acc, fin: true, timeout: 10_000)
      {:close, state}
    end
  end

  setup_all do
    %{python: python!()}
  end

  describe "Quichex client -> aioquic server" do
    test "handshake, bidi and uni echo, application close", %{python: python} do
      {server, port} = start_server!(python, ["--alpn", alpn()])
      conn = connect!(port, stream_opts: [active: false])
      assert_receive {:quic_connected, ^conn}, 1_000
      await_line(server, ~r/^CONNECTED quichex-test$/)

      assert {:ok, %{alpn: "quichex-test", is_server: false, retry: false}} =
               Connection.info(conn)

      # Bidirectional: 1 MB sent from a task while this process reads the echo.
      payload = random_bytes(1_000_000)
      {:ok, bidi} = Connection.open_stream(conn, :bidirectional, active: false)

      sender =
        Task.async(fn -> Quichex.Stream.send(bidi, payload, fin: true, timeout: 10_000) end)

      assert recv_all(bidi) == payload
      assert Task.await(sender, 11_000) == :ok

      # Unidirectional: the echo comes back on a stream the server opens.
      uni_payload = random_bytes(100_000)
      {:ok, uni} = Connection.open_stream(conn, :unidirectional, active: false)
      assert :ok = Quichex.Stream.send(uni, uni_payload, fin: true, timeout: 5_000)

      assert_receive {:quic_stream_opened, ^conn, echo, :unidirectional}, 5_000

      assert {:ok, %{initiator: :remote, direction: :unidirectional, id: id}} =
               Quichex.Stream.info(echo)

      # Server-initiated unidirectional ids are 3 mod 4.
      assert Bitwise.band(id, 3) == 3
      assert recv_all(echo) == uni_payload

      :ok = Connection.close(conn, error_code: 42, reason: "bye")
      assert_receive {:quic_connection_closed, ^conn, 42, :local}, 1_000
      await_line(server, ~r/^CLOSED 42 bye$/)
    end

    test "handshake through a Retry", %{python: python} do
      {server, port} = start_server!(python, ["--alpn", alpn(), "--retry"])
      conn = connect!(port, stream_opts: [active: false])
      await_line(server, ~r/^CONNECTED quichex-test$/)
      assert {:ok, %{alpn: "quichex-test", retry: true}} = Connection.info(conn)

      # The connection works after the Retry.
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      :ok = Quichex.Stream.send(stream, "after retry", fin: true)
      assert recv_all(stream) == "after retry"

      :ok = Connection.close(conn, error_code: 0, reason: "done")
      await_line(server, ~r/^CLOSED 0 done$/)
    end

    test "an ALPN the server does not speak fails the handshake", %{python: python} do
      {server, port} = start_server!(python, ["--alpn", alpn()])

      {:ok, conn} =
        Connection.connect(
          host: "localhost",
          port: port,
          config: client_config(application_protos: ["nope"])
        )

      error =
        case Connection.wait_connected(conn, timeout: 5_000) do
          {:error, %TransportError{} = error} ->
            assert_receive {:quic_connection_error, ^conn, %TransportError{}}, 1_000
            error

          # The connection ended before the call reached it (a busy
          # machine): calls then answer {:error, :closed}, and the owner
          # was told why.
          {:error, :closed} ->
            assert_receive {:quic_connection_error, ^conn, %TransportError{} = error}, 1_000
            error
        end

      # no_application_protocol alert (0x100 + 120), sent by aioquic.
      assert {:transport, 0x178, _phrase} = error.reason
      await_line(server, ~r/^CLOSED 376 /)
      refute_received {:quic_connected, ^conn}
    end
  end

  describe "aioquic client -> Quichex listener" do
    test "echoes 8 bidi and 2 uni streams of 200 kB", %{python: python} do
      {listener, port} = start_listener(handler: Echo)

      assert {0, result} =
               run_client!(python, port, [
                 "--alpn",
                 alpn(),
                 "--streams",
                 "8",
                 "--uni",
                 "2",
                 "--size",
                 "200000"
               ])

      assert %{ok: true, alpn: "quichex-test", bidi: 8, uni: 2, bytes: 2_000_000, error: nil} =
               result

      # The client's CONNECTION_CLOSE ends the connection on our side too.
      eventually(fn -> match?({:ok, %{connections: 0, accepted: 1}}, Listener.stats(listener)) end)
    end

    test "handshake and close only: the peer's code and reason reach us", %{python: python} do
      {listener, port} = start_listener(active: true)

      # aioquic closes as soon as its handshake completes, before it is
      # confirmed, so its CONNECTION_CLOSE goes out in one datagram as a
      # Handshake packet (transport close APPLICATION_ERROR) coalesced with a
      # 1-RTT packet (application close 7 "done"). RFC 9000 section 12.2: a
      # receiver that cannot decrypt one packet of a datagram MUST still
      # process the others. Our server has already dropped its Handshake
      # keys, and quiche 0.30's recv() then discards the rest of the datagram,
      # so as of this writing the close is lost and this test fails (the
      # connection stays up until its idle timeout).
      assert {0, %{ok: true, alpn: "quichex-test", bidi: 0, uni: 0, error: nil}} =
               run_client!(python, port, [
                 "--alpn",
                 alpn(),
                 "--streams",
                 "0",
                 "--close-code",
                 "7",
                 "--close-reason",
                 "done"
               ])

      conn = accept!(listener, 1_000)
      assert_closed(conn, 7, "done", 2_000)
    end

    test "the peer's close code and reason reach us after an exchange", %{python: python} do
      {listener, port} = start_listener(active: true, stream_opts: [active: true])

      # With one bidi stream the close comes after a round trip, when aioquic
      # has confirmed the handshake, so it is a lone 1-RTT packet. The
      # controlling process (this one) plays the echo server.
      client = Task.async(fn -> run_client!(python, port, client_args(1, 1000, 9, "later")) end)
      conn = accept!(listener, 5_000)
      assert_receive {:quic_stream_opened, ^conn, stream, :bidirectional}, 5_000
      echo_active(conn, stream)

      assert {0, %{ok: true, bidi: 1, error: nil}} = Task.await(client, 15_000)
      assert_closed(conn, 9, "later", 2_000)
    end

    test "a listener with retry: true validates the client's address", %{python: python} do
      {listener, port} = start_listener(handler: Echo, retry: true)

      assert {0, %{ok: true, alpn: "quichex-test", bidi: 1, error: nil}} =
               run_client!(python, port, ["--alpn", alpn(), "--streams", "1", "--size", "5000"])

      {:ok, stats} = Listener.stats(listener)
      assert stats.retry_sent >= 1
      assert stats.retry_validated >= 1
      assert stats.invalid_token == 0
      assert stats.accepted == 1
    end
  end

  defp client_args(streams, size, code, reason) do
    ["--alpn", alpn(), "--streams", "#{streams}", "--size", "#{size}"] ++
      ["--close-code", "#{code}", "--close-reason", reason]
  end

  # Collects an active-mode stream until the peer's FIN, then echoes it all
  # with FIN (not a FIN on its own: see Echo).
  defp echo_active(conn, stream, acc \\ []) do
    receive do
      {:quic_stream, ^conn, ^stream, data} ->
        echo_active(conn, stream, [acc | data])

      {:quic_stream_fin, ^conn, ^stream} ->
        :ok = Quichex.Stream.send(stream, acc, fin: true)
    after
      5_000 -> flunk("the aioquic client's stream did not finish within 5 s")
    end
  end

  defp assert_closed(conn, code, phrase, timeout) do
    receive do
      {:quic_connection_closed, ^conn, ^code, %ApplicationError{} = error} ->
        assert %ApplicationError{code: ^code, reason: :connection_close, phrase: ^phrase} = error

      {:quic_connection_closed, ^conn, other_code, reason} ->
        flunk(
          "the connection closed with #{other_code}, #{inspect(reason)}; " <>
            "expected application close #{code} #{inspect(phrase)}"
        )
    after
      timeout ->
        state =
          case Connection.info(conn, timeout: 1_000) do
            {:ok, info} -> info.state
            {:error, reason} -> reason
          end

        flunk("""
        no {:quic_connection_closed, conn, #{code}, %ApplicationError{}} within #{timeout} ms \
        after the aioquic client closed; our connection is still #{inspect(state)}.
        """)
    end
  end

  # Reads a passive stream until FIN.
  defp recv_all(stream, acc \\ []) do
    case Quichex.Stream.recv(stream, length: 0, timeout: 5_000) do
      {:ok, data, true} ->
        IO.iodata_to_binary([acc | data])

      {:ok, data, false} ->
        recv_all(stream, [acc | data])

      {:error, reason} ->
        flunk("recv failed after #{IO.iodata_length(acc)} bytes: #{inspect(reason)}")
    end
  end
end
