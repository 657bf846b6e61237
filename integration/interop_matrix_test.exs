defmodule Quichex.InteropMatrixTest do
  # The interop matrix: every case of @cases against every peer listed for
  # it, in each direction listed, generated at compile time. Each test is
  # tagged `matrix: {case, peer, direction}`, so Quichex.Test.MatrixFormatter
  # puts it in the table of integration/RESULTS.md.
  #
  # Peers (see integration/peers/README.md):
  #
  #   * aioquic - integration/peers/aioquic_echo_{server,client}.py, run by
  #     $QUICHEX_PYTHON (default _build/venv/bin/python);
  #   * quinn - integration/peers/quinn_peer ($QUICHEX_QUINN_PEER, default
  #     its target/release/quinn_peer);
  #   * ngtcp2 - Debian's gtlsserver / gtlsclient (ngtcp2 0.12, GnuTLS).
  #
  # A missing peer fails its tests (Quichex.Test.Interop flunks); nothing is
  # skipped. `make deps-peers` builds the first two; the ngtcp2 programs come
  # from the ngtcp2-client and ngtcp2-server packages.
  #
  # The aioquic and quinn peers speak an echo protocol: a bidi stream is
  # echoed, a uni stream comes back on a new uni stream of the server, and a
  # bidi stream starting with `RESET <code>\n` / `STOP <code>\n` is reset /
  # stopped with that code, and a DATAGRAM frame comes back as one. Their
  # server prints CONNECTED, CLOSED, STREAM_RESET, STOP_SENDING and DATAGRAMS
  # lines; their client prints one JSON line.
  # MatrixHandler below plays the same server on our side.
  #
  # ngtcp2's programs speak only HTTP/3 (ALPN h3), so its rows are
  # handshake-level. "Pass" there means: the handshake completes on both
  # sides with ALPN h3 (our Connection.info/handler on one side, ngtcp2's
  # "Negotiated ALPN is h3" debug line on the other), and our application
  # CONNECTION_CLOSE with H3_NO_ERROR (0x100) reaches ngtcp2 (its "frm rx ...
  # CONNECTION_CLOSE(0x1d) ... (0x100)" line). No HTTP/3 is spoken: our
  # client ignores the server's control streams, and our listener reads and
  # ignores the request of ngtcp2's client.
  #
  # Cases that exist in one direction only:
  #
  #   * key update: Quichex has no API to start a key update, so only their
  #     client updates keys (--key-update) while it sends to our listener.
  #     quinn also starts key updates on its own every few hundred packets,
  #     so every multi-MB transfer with quinn, in both directions, includes
  #     key updates that quiche must handle.
  #   * version negotiation: Quichex's client offers QUIC v1 only, so only
  #     their client starts with a version quiche does not know: aioquic with
  #     0x1a2a3a4a (a reserved "?a?a?a?a" version, RFC 9000 section 15) and
  #     then v1 from the Version Negotiation packet; quinn with draft-29
  #     (0xff00001d; it cannot start with an unknown version) and, since
  #     quinn fails an attempt on Version Negotiation, a new attempt with v1;
  #     ngtcp2 with `-v 0x1a2a3a4a --preferred-versions v1`.
  #
  # Resumption and 0-RTT: the client connects once for a session ticket,
  # then again with it, sending its request as 0-RTT data. Their servers
  # print RESUMED, EARLY_DATA accepted and EARLY_STREAM <id> <bytes> (the
  # bytes of a stream read before the handshake completed); their clients
  # report `resumed` and `early_data` (--resume --early-data). The second
  # connection goes through a proxy that delays every datagram by 50 ms, so
  # that the request surely leaves (and is read) before the handshake
  # completes: on bare loopback the server's reply can come before our
  # client's open_stream/send reaches its connection process (seen against
  # aioquic in a fresh VM, whose first open_stream loads modules), and the
  # request then goes as 1-RTT data although 0-RTT was accepted.
  #
  # Migration (quinn only: quinn_peer's client moves with one call,
  # Endpoint::rebind; the aioquic scripts have no such flag): the client
  # moves to a new local port in the middle of a 5 MB echo, with data in
  # flight - ours with Connection.migrate/4 once half the echo is back,
  # quinn's client by rebinding its endpoint once half is written
  # (--rebind) - and the other side must follow (our {:peer_migrated, ...}
  # path event; quinn_peer server's MIGRATED line). These cases found three
  # quiche 0.30 bugs, fixed in our vendored copy (native/vendor/PATCHES.md):
  # a late packet for a just-retired connection ID closed the connection
  # (patch G), and a PATH_CHALLENGE whose packet quinn acknowledged but
  # whose PATH_RESPONSE was lost was never retried (patch H); and one of
  # ours: a client read its busy old socket before the new path's, so the
  # PATH_RESPONSE could come more than 128 packets late, which quiche counts
  # as a duplicate (the connection now reads its sockets in turn).
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{ApplicationError, Connection, Listener, TransportError}
  alias Quichex.Test.{Interop, Matrix}

  @moduletag :interop
  @moduletag timeout: 300_000

  @client "our client -> their server"
  @server "their client -> our server"
  @directions %{client: @client, server: @server}

  @echo_peers [:aioquic, :quinn]
  @both [:client, :server]

  # {id, name in the table, peers, directions}
  @cases [
    {:handshake, "handshake", @echo_peers ++ [:ngtcp2], @both},
    {:transfer, "transfer 10 MB", @echo_peers, @both},
    {:multiplexing, "multiplexing 200 x 1 kB", @echo_peers, @both},
    {:uni, "unidirectional streams", @echo_peers, @both},
    {:close, "close: application code and reason", @echo_peers, @both},
    {:reset, "stream reset codes", @echo_peers, @both},
    {:stop, "stop_sending codes", @echo_peers, @both},
    {:shutdown_both, "shutdown :both (reset and stop)", @echo_peers, [:client]},
    {:retry, "retry", @echo_peers, @both},
    {:chacha20, "ChaCha20-Poly1305 only", @echo_peers, @both},
    {:key_update, "key update during 4 MB", @echo_peers, [:server]},
    {:idle_timeout, "idle timeout", @echo_peers, @both},
    {:version_negotiation, "version negotiation", @echo_peers ++ [:ngtcp2], [:server]},
    {:dgram, "datagrams", @echo_peers, @both},
    {:resumption, "resumption and 0-RTT", @echo_peers, @both},
    {:migration, "migration mid-transfer", [:quinn], @both}
  ]

  @mb 1_000_000
  @transfer 10 * @mb
  @transfer_timeout 60_000
  # Bounds a read loop even if every recv/2 returns one byte.
  @max_reads 1_000_000

  # First versions offered in the version negotiation case.
  @unknown_version %{aioquic: "0x1a2a3a4a", quinn: "0xff00001d", ngtcp2: "0x1a2a3a4a"}

  # The datagram case: how many, how large, and the share that must come
  # back (DATAGRAM frames are never retransmitted). They go out in bursts,
  # each followed by a wait for the echoes: sent all at once, a whole
  # congestion window reaches the peer in one go and overflows the UDP
  # receive buffer of a slow one (aioquic, in Python). Both directions use
  # the same bursts (the peers' --dgram-burst).
  @dgrams 200
  @dgram_size 1_000
  @dgram_burst 20
  @dgram_min_echoed 180
  # Stop waiting for echoes after this long without one.
  @dgram_quiet 500

  # The resumption case: the request sent as 0-RTT data (it fits in the
  # client's first flight).
  @early_request 4_000
  # ... through a proxy that delays each datagram by this many ms.
  @early_delay 50
  # The migration case: echoed on one stream; the client moves once the
  # first half has come back.
  @migration_size 5 * @mb

  # H3_NO_ERROR, for closing HTTP/3 connections politely.
  @h3_no_error 0x100

  for {id, name, peers, directions} <- @cases, peer <- peers, direction <- directions do
    @tag matrix: {name, Atom.to_string(peer), @directions[direction]}
    # For --only: e.g. `mix test integration/interop_matrix_test.exs --only matrix_case:reset`.
    @tag matrix_case: id, matrix_peer: peer, matrix_direction: direction
    test "#{name} | #{peer} | #{@directions[direction]}", context do
      run(unquote(id), unquote(peer), unquote(direction), context)
    end
  end

  defmodule MatrixHandler do
    # The echo server of the peers, on our side (handler_options: %{test:
    # pid}). Bidi streams are echoed chunk by chunk, and the peer's FIN is
    # answered with close/1 (an empty FIN on its own). `RESET <code>\n` /
    # `STOP <code>\n` at the start of a bidi stream make us call
    # Quichex.Stream.shutdown(:write / :read) with that code. A uni stream is
    # echoed on a new uni stream after its FIN. With `silent: true` streams
    # are read and ignored (for HTTP/3 clients). Every DATAGRAM frame is
    # echoed as one. Everything observed is sent to the test process as
    # {:matrix_..., ...} messages, 0-RTT outcomes (with Connection.info/1 at
    # that moment) and path events included; with `stream_states: true`, the
    # connection's state when each stream opened too.
    use Quichex.Handler

    alias Quichex.{Connection, Stream}

    @send_timeout 30_000

    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = opts) do
      {:ok, info} = Connection.info(conn)
      send(test, {:matrix_connected, conn, info.alpn})
      {:continue, Map.put(opts, :conn, conn)}
    end

    @impl Quichex.Handler
    def handle_early_data(outcome, %{test: test, conn: conn} = opts) do
      send(test, {:matrix_early_data, conn, outcome, Connection.info(conn)})
      {:continue, opts}
    end

    @impl Quichex.Handler
    def handle_path_event(event, conn, %{test: test} = opts) do
      send(test, {:matrix_path_event, conn, event})
      {:continue, opts}
    end

    @impl Quichex.Handler
    def handle_close(conn, reason, %{test: test}) do
      send(test, {:matrix_closed, conn, reason})
    end

    @impl Quichex.Handler
    def handle_datagram(data, conn, %{test: test} = opts) do
      case Connection.dgram_send(conn, data) do
        :ok -> :ok
        {:error, reason} -> send(test, {:matrix_dgram_refused, reason})
      end

      {:continue, opts}
    end

    @impl Quichex.Handler
    def handle_stream_open(stream, opts) do
      {:ok, %{direction: dir, connection: conn, id: id}} = Stream.info(stream)
      head = if dir == :bidirectional, do: "", else: nil

      # :handshaking here means the stream came as 0-RTT data.
      if opts[:stream_states] do
        {:ok, %{state: state}} = Connection.info(conn)
        send(opts.test, {:matrix_stream_opened, conn, id, state})
      end

      {:continue, Map.merge(opts, %{dir: dir, conn: conn, id: id, head: head, acc: []})}
    end

    @impl Quichex.Handler
    def handle_data(_data, _stream, %{silent: true} = st), do: {:continue, st}

    def handle_data(data, _stream, %{dir: :unidirectional} = st),
      do: {:continue, %{st | acc: [st.acc | data]}}

    def handle_data(_data, _stream, %{head: :command} = st), do: {:continue, st}

    def handle_data(data, stream, %{head: head} = st) when is_binary(head) do
      head = head <> data

      case classify(head) do
        :wait ->
          {:continue, %{st | head: head}}

        {how, code} ->
          :ok = Stream.shutdown(stream, how, error_code: code)
          send(st.test, {:matrix_shutdown, st.id, how, code})
          {:continue, %{st | head: :command}}

        :echo ->
          echo(head, stream, %{st | head: nil})
      end
    end

    def handle_data(data, stream, st), do: echo(data, stream, st)

    @impl Quichex.Handler
    def handle_fin(_stream, %{silent: true} = st), do: {:continue, st}

    def handle_fin(_stream, %{dir: :unidirectional} = st) do
      {:ok, out} =
        Connection.open_stream(st.conn, :unidirectional, timeout: @send_timeout, active: false)

      :ok = Stream.send(out, st.acc, fin: true, timeout: @send_timeout)
      {:close, st}
    end

    def handle_fin(_stream, %{head: :command} = st), do: {:close, st}

    def handle_fin(stream, st) do
      # A stream shorter than a command is echoed as it is.
      if is_binary(st.head), do: :ok = Stream.send(stream, st.head, timeout: @send_timeout)
      :ok = Stream.close(stream, timeout: @send_timeout)
      {:close, st}
    end

    @impl Quichex.Handler
    def handle_reset(code, _stream, st) do
      send(st.test, {:matrix_reset, st.id, code})
      {:close, st}
    end

    @impl Quichex.Handler
    def handle_stopped(code, _stream, st) do
      send(st.test, {:matrix_stopped, st.id, code})
      {:close, st}
    end

    defp echo(data, stream, st) do
      :ok = Stream.send(stream, data, timeout: @send_timeout)
      {:continue, st}
    end

    # The peers' rule: a command line is at most 32 bytes.
    @doc false
    def classify(head) do
      words = ["RESET ", "STOP "]

      cond do
        not Enum.any?(words, &(prefix?(head, &1) or prefix?(&1, head))) ->
          :echo

        not String.contains?(head, "\n") ->
          if byte_size(head) < 32, do: :wait, else: :echo

        true ->
          [line | _] = :binary.split(head, "\n")

          case String.split(line, " ") do
            ["RESET", code] -> command(:write, code)
            ["STOP", code] -> command(:read, code)
            _ -> :echo
          end
      end
    end

    defp command(how, code) do
      case Integer.parse(code) do
        {code, ""} when code >= 0 -> {how, code}
        _ -> :echo
      end
    end

    defp prefix?(bin, prefix),
      do: byte_size(bin) >= byte_size(prefix) and binary_part(bin, 0, byte_size(prefix)) == prefix
  end

  ## Cases. run(case, peer, direction, context)

  # --- handshake: the ALPN is seen on both sides.

  defp run(:handshake, :ngtcp2, :client, _context) do
    {server, port} = Interop.start_ngtcp2_server!()
    conn = connect_to!(port, application_protos: ["h3"])
    assert {:ok, %{alpn: "h3", is_server: false}} = Connection.info(conn)
    Interop.await_line(server, ~r/^Negotiated ALPN is h3$/)
    :ok = Connection.close(conn, error_code: @h3_no_error, reason: "")
    Interop.await_line(server, ~r/frm rx .*CONNECTION_CLOSE\(0x1d\) error_code=.*\(0x100\)/)
  end

  defp run(:handshake, :ngtcp2, :server, _context) do
    {_listener, port} = our_listener(handler_options: %{silent: true}, alpn: "h3")
    lines = ngtcp2_client_until_closed!(port, [], ["https://localhost/"])
    assert_line(lines, ~r/^Negotiated ALPN is h3$/)
  end

  defp run(:handshake, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)
    assert {:ok, %{alpn: "quichex-test", is_server: false}} = Connection.info(conn)
    Interop.await_line(server, ~r/^CONNECTED quichex-test$/)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:handshake, peer, :server, _context) do
    {_listener, port} = our_listener()
    result = client!(peer, port, ["--streams", "0"])
    assert result.alpn == "quichex-test"
    assert_receive {:matrix_connected, _conn, "quichex-test"}, 5_000
  end

  # --- transfer: one stream, 10 MB, echoed byte for byte.

  defp run(:transfer, peer, :client, context) do
    {_server, port} = echo_server!(peer)
    conn = connect_to!(port)
    elapsed = echo!(conn, random_bytes(@transfer), @transfer_timeout)
    Matrix.record_mbps(context, @transfer / @mb / (max(elapsed, 1) / 1000))
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:transfer, peer, :server, context) do
    {_listener, port} = our_listener()

    result = client!(peer, port, ["--streams", "1", "--size", "#{@transfer}"], @transfer_timeout)

    assert %{bidi: 1, bytes: @transfer} = result
    # Measured by the client, from the end of its handshake to the last check.
    Matrix.record_mbps(context, result.mbps)
  end

  # --- multiplexing: 200 concurrent streams of 1 kB.

  defp run(:multiplexing, peer, :client, _context) do
    {_server, port} = echo_server!(peer)
    conn = connect_to!(port)

    results =
      1..200
      |> Task.async_stream(
        fn _ ->
          payload = random_bytes(1_000)
          {echo_result(conn, payload, 30_000), payload}
        end,
        max_concurrency: 200,
        timeout: 40_000
      )
      |> Enum.map(fn {:ok, result} -> result end)

    failed = for {got, payload} <- results, got != {:ok, payload}, do: got

    assert failed == [],
           "#{length(failed)} of 200 streams failed: #{inspect(Enum.take(failed, 3))}"

    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:multiplexing, peer, :server, _context) do
    # Room for all 200 at once (the default allows 100 open streams).
    {_listener, port} = our_listener(config_opts: [initial_max_streams_bidi: 256])

    assert %{bidi: 200, bytes: 200_000} =
             client!(peer, port, ["--streams", "200", "--size", "1000"], 30_000)
  end

  # --- unidirectional streams: ours echoed on theirs, theirs on ours.

  defp run(:uni, peer, :client, _context) do
    {_server, port} = echo_server!(peer)
    conn = connect_to!(port)
    payloads = [random_bytes(100_000), random_bytes(50_000)]

    for payload <- payloads do
      {:ok, uni} = Connection.open_stream(conn, :unidirectional, active: false)
      :ok = Quichex.Stream.send(uni, payload, fin: true, timeout: 10_000)
    end

    echoes =
      for _ <- payloads do
        receive do
          {:quic_stream_opened, ^conn, echo, :unidirectional} ->
            assert {:ok, %{initiator: :remote, id: id}} = Quichex.Stream.info(echo)
            # Server-initiated unidirectional ids are 3 mod 4.
            assert Bitwise.band(id, 3) == 3
            assert {:ok, data} = read_all(echo, 10_000)
            data
        after
          10_000 -> flunk("the server did not open a uni stream within 10 s")
        end
      end

    assert Enum.sort(echoes) == Enum.sort(payloads)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:uni, peer, :server, _context) do
    {_listener, port} = our_listener()

    assert %{uni: 2, bytes: 200_000} =
             client!(peer, port, ["--streams", "0", "--uni", "2", "--size", "100000"])
  end

  # --- close: our code and reason in their CLOSED line; theirs in our message.

  defp run(:close, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)
    # One exchange first: the handshake is confirmed on both sides.
    echo!(conn, "ping", 5_000)
    :ok = Connection.close(conn, error_code: 42, reason: "matrix bye")
    assert_receive {:quic_connection_closed, ^conn, 42, :local}, 2_000
    Interop.await_line(server, ~r/^CLOSED 42 matrix bye$/)
  end

  defp run(:close, peer, :server, _context) do
    # Active mode: this process is the controlling process and echoes the
    # client's one stream itself, so it gets {:quic_connection_closed, ...}.
    # (With no stream at all, aioquic closes before its handshake is
    # confirmed; see "handshake and close only" in interop_aioquic_test.exs.)
    {listener, port} = our_listener(handler: nil, active: true, stream_opts: [active: true])
    args = ["--streams", "1", "--close-code", "7", "--close-reason", "their bye"]
    client = Task.async(fn -> run_client(peer, port, args, 10_000) end)

    conn =
      receive do
        {:quic_connection, ^listener, conn, _peer} -> conn
      after
        10_000 -> flunk("no connection from the #{peer} client")
      end

    assert_receive {:quic_stream_opened, ^conn, stream, :bidirectional}, 5_000
    echo_active(conn, stream)
    check_client!(Task.await(client, 20_000))

    assert_receive {:quic_connection_closed, ^conn, 7, %ApplicationError{} = error}, 2_000
    assert %ApplicationError{code: 7, reason: :connection_close, phrase: "their bye"} = error
  end

  # --- stream reset: their RESET_STREAM code reaches us, ours reaches them.

  defp run(:reset, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)

    # Theirs: the server resets a stream that starts with "RESET 77\n".
    {:ok, asked} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Quichex.Stream.send(asked, "RESET 77\n")
    assert {:error, {:reset, 77}} = Quichex.Stream.recv(asked, timeout: 5_000)

    # Ours: reset our sending side of an echo stream.
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    {:ok, %{id: id}} = Quichex.Stream.info(stream)
    :ok = Quichex.Stream.send(stream, "hello")
    assert {:ok, "hello", false} = Quichex.Stream.recv(stream, length: 5, timeout: 5_000)
    :ok = Quichex.Stream.shutdown(stream, :write, error_code: 79)
    Interop.await_line(server, ~r/^STREAM_RESET #{id} 79$/)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:reset, peer, :server, _context) do
    {_listener, port} = our_listener()

    # --reset-code: the client resets a stream (ours: handle_reset/3);
    # --ask-reset: it sends "RESET 77\n" and we call Stream.shutdown(:write).
    result = client!(peer, port, ["--streams", "0", "--reset-code", "79", "--ask-reset", "77"])
    assert %{reset_sent: 79, peer_reset: 77} = result
    assert_receive {:matrix_reset, _id, 79}, 2_000
    assert_receive {:matrix_shutdown, _id, :write, 77}, 2_000
  end

  # --- shutdown(:both), and :read then :write back to back: the peer sees
  # both our RESET_STREAM and our STOP_SENDING.

  defp run(:shutdown_both, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)

    for {how, read_code, write_code} <- [{:both, 81, 81}, {:back_to_back, 82, 83}] do
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      {:ok, %{id: id}} = Quichex.Stream.info(stream)
      :ok = Quichex.Stream.send(stream, "hello")
      assert {:ok, "hello", false} = Quichex.Stream.recv(stream, length: 5, timeout: 5_000)

      case how do
        :both ->
          :ok = Quichex.Stream.shutdown(stream, :both, error_code: read_code)

        :back_to_back ->
          :ok = Quichex.Stream.shutdown(stream, :read, error_code: read_code)
          :ok = Quichex.Stream.shutdown(stream, :write, error_code: write_code)
      end

      # Both frames, in whichever order the peer reports them.
      reset = "STREAM_RESET #{id} #{write_code}"
      stop = "STOP_SENDING #{id} #{read_code}"
      [first | _] = Interop.await_line(server, ~r/^(#{reset}|#{stop})$/)
      other = if first == reset, do: stop, else: reset
      Interop.await_line(server, ~r/^#{other}$/)
    end

    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  # --- stop_sending: their STOP_SENDING code reaches us, ours reaches them.

  defp run(:stop, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)

    # Theirs: the server stops a stream that starts with "STOP 78\n".
    {:ok, asked} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Quichex.Stream.send(asked, "STOP 78\n")
    assert_receive {:quic_stream_stopped, ^conn, ^asked, 78}, 5_000
    assert {:error, {:stopped, 78}} = Quichex.Stream.send(asked, "more")

    # Ours: stop their sending side of an echo stream.
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    {:ok, %{id: id}} = Quichex.Stream.info(stream)
    :ok = Quichex.Stream.send(stream, "hello")
    assert {:ok, "hello", false} = Quichex.Stream.recv(stream, length: 5, timeout: 5_000)
    :ok = Quichex.Stream.shutdown(stream, :read, error_code: 80)
    Interop.await_line(server, ~r/^STOP_SENDING #{id} 80$/)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:stop, peer, :server, _context) do
    {_listener, port} = our_listener()

    # --stop-code: the client sends STOP_SENDING (ours: handle_stopped/3);
    # --ask-stop: it sends "STOP 78\n" and we call Stream.shutdown(:read).
    result = client!(peer, port, ["--streams", "0", "--stop-code", "80", "--ask-stop", "78"])
    assert %{stop_sent: 80, peer_stop: 78} = result
    assert_receive {:matrix_shutdown, _id, :read, 78}, 2_000

    receive do
      {:matrix_stopped, _id, 80} -> :ok
    after
      2_000 ->
        # The client sends "x" and STOP_SENDING in one packet. Quichex 0.1.0
        # checks for STOP_SENDING (check_stopped/2) before it creates the
        # stream processes of that pass (dispatch_readable/2), and the
        # check is not repeated, so neither {:quic_stream_stopped, ...} nor
        # handle_stopped/3 ever comes, although quiche answered with
        # RESET_STREAM 80 (the client saw it).
        flunk("handle_stopped(80, ...) was never called on our side")
    end
  end

  # --- retry: address validation with a Retry packet.

  defp run(:retry, peer, :client, _context) do
    {server, port} = echo_server!(peer, ["--retry"])
    conn = connect_to!(port)
    assert {:ok, %{alpn: "quichex-test", retry: true}} = Connection.info(conn)
    Interop.await_line(server, ~r/^CONNECTED quichex-test$/)
    echo!(conn, random_bytes(10_000), 5_000)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:retry, peer, :server, _context) do
    {listener, port} = our_listener(retry: true)
    assert %{bidi: 1} = client!(peer, port, ["--streams", "1", "--size", "10000"])
    {:ok, stats} = Listener.stats(listener)
    assert %{retry_sent: sent, retry_validated: validated, invalid_token: 0} = stats
    assert sent >= 1 and validated >= 1, inspect(stats)
  end

  # --- ChaCha20-Poly1305: the peer allows no other TLS cipher suite.

  defp run(:chacha20, peer, :client, _context) do
    {_server, port} = echo_server!(peer, ["--chacha20"])
    conn = connect_to!(port)
    echo!(conn, random_bytes(100_000), 10_000)
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:chacha20, peer, :server, _context) do
    {_listener, port} = our_listener()

    assert %{bidi: 1, bytes: 100_000} =
             client!(peer, port, ["--chacha20", "--streams", "1", "--size", "100000"])
  end

  # --- key update: their client updates the 1-RTT keys halfway through.

  defp run(:key_update, peer, :server, context) do
    {_listener, port} = our_listener()
    args = ["--key-update", "--streams", "2", "--size", "2000000"]
    result = client!(peer, port, args, @transfer_timeout)
    assert result.bytes == 4 * @mb

    case peer do
      # aioquic reports its key phase: 1 after one update.
      :aioquic -> assert result.key_phase == 1, inspect(result)
      # quinn cannot report it; it says it called force_key_update().
      :quinn -> assert result.key_update == true, inspect(result)
    end

    Matrix.record_mbps(context, result.mbps)
  end

  # --- idle timeout: the shorter timeout of the two ends the connection.

  defp run(:idle_timeout, peer, :client, _context) do
    # Their server's 0.5 s beats our 30 s; nobody sends anything.
    {_server, port} = echo_server!(peer, ["--idle-timeout", "0.5"])
    conn = connect_to!(port)
    started = now()

    receive do
      {:quic_connection_closed, ^conn, code, reason} ->
        assert {code, reason} == {0, %TransportError{reason: :idle_timeout}}
    after
      5_000 -> flunk("no idle timeout within 5 s (the peer's is 0.5 s)")
    end

    # quiche uses max(idle timeout, 3 PTO): about 0.5 s on loopback.
    assert now() - started >= 400
  end

  defp run(:idle_timeout, peer, :server, _context) do
    {_listener, port} = our_listener(config_opts: [max_idle_timeout: 500])
    # --wait-idle: after its echo the client sends nothing and does not close.
    # Both sides use the smaller timeout, ours, so both time out.
    result = client!(peer, port, ["--streams", "1", "--wait-idle", "5"], 15_000)
    assert %{ended: "idle timeout", ended_after_ms: waited} = result
    assert waited >= 400, inspect(result)
    assert_receive {:matrix_closed, _conn, %TransportError{reason: :idle_timeout}}, 5_000
  end

  # --- version negotiation: their client starts with a version quiche lacks.

  defp run(:version_negotiation, :ngtcp2, :server, _context) do
    {listener, port} = our_listener(handler_options: %{silent: true}, alpn: "h3")
    options = ["-v", @unknown_version.ngtcp2, "--preferred-versions", "v1"]
    lines = ngtcp2_client_until_closed!(port, options, ["https://localhost/"])
    assert_line(lines, ~r/version=0x1a2a3a4a type=Initial/)
    assert_line(lines, ~r/type=VN/)
    assert_line(lines, ~r/^Client selected version 0x1$/)
    assert_line(lines, ~r/^Negotiated ALPN is h3$/)
    assert_version_negotiated(listener)
  end

  defp run(:version_negotiation, peer, :server, _context) do
    {listener, port} = our_listener()
    args = ["--version", @unknown_version[peer], "--streams", "1"]
    assert %{vn: true, version: 1, bidi: 1} = client!(peer, port, args)
    assert_version_negotiated(listener)
  end

  # --- datagrams (RFC 9221): echoed one by one; a few may be lost, none may
  # be corrupted, duplicated or made up.

  defp run(:dgram, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port, enable_dgram: true)

    {:ok, max} = Connection.dgram_max_size(conn)
    assert max >= @dgram_size
    assert {:error, {:too_big, ^max}} = Connection.dgram_send(conn, random_bytes(max + 1))

    # Each one unique: its index, then random bytes.
    sent = for i <- 1..@dgrams, do: <<i::32, random_bytes(@dgram_size - 4)::binary>>

    echoes =
      sent
      |> Enum.chunk_every(@dgram_burst)
      |> Enum.reduce([], fn burst, echoes ->
        Enum.each(burst, &(:ok = Connection.dgram_send(conn, &1)))
        receive_dgrams(conn, echoes, length(echoes) + length(burst), @dgram_quiet)
      end)

    :ok = Connection.close(conn, error_code: 0, reason: "done")
    # Late ones count too (for duplicates and strangers).
    echoes = Enum.reverse(receive_dgrams(conn, echoes, :infinity, 0))

    assert_dgram_echoes(sent, echoes)
    # What the server received lies between what came back and what we sent.
    [_, got] = Interop.await_line(server, ~r/^DATAGRAMS (\d+)$/)
    assert String.to_integer(got) in length(echoes)..@dgrams
  end

  defp run(:dgram, peer, :server, _context) do
    {_listener, port} = our_listener(config_opts: [enable_dgram: true])
    args = ["--streams", "0", "--dgrams", "#{@dgrams}", "--dgram-size", "#{@dgram_size}"]
    args = args ++ ["--dgram-burst", "#{@dgram_burst}"]
    result = client!(peer, port, args, 20_000)
    refused = for {:matrix_dgram_refused, reason} <- flush_messages(), do: reason

    # The client checks each echo byte for byte (dgrams_bad: echoes that
    # match nothing it sent).
    assert %{dgrams_sent: @dgrams, dgrams_dup: 0, dgrams_bad: 0} = result
    assert result.dgrams_echoed >= @dgram_min_echoed, inspect({result, refused: refused})
    assert refused == [], "our dgram_send/3 refused echoes: #{inspect(Enum.frequencies(refused))}"
  end

  # --- resumption and 0-RTT: a second connection resumes with a session
  # ticket of the first and sends its request as 0-RTT data; the server
  # accepts it. Both sides say so, the server got the whole request before
  # the handshake completed, and the echo is byte-exact. The second
  # connection goes through a proxy that delays every datagram by
  # @early_delay ms: the handshake then takes long enough that the request
  # surely leaves (and is read) before it completes, whoever is quicker.

  defp run(:resumption, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    early = [enable_early_data: true]

    first = connect_to!(port, early)
    assert_receive {:quic_session_ticket, ^first, _ticket}, 5_000
    # The latest one: rustls sends two, aioquic one.
    {:ok, ticket} = Connection.session(first)
    assert {:ok, %{resumed: false, early_data: :none}} = Connection.info(first)
    :ok = Connection.close(first, error_code: 0, reason: "done")

    proxy_port = delay_proxy!(port)
    conn = connect_to!(proxy_port, early, session: ticket, early_data: true, wait: false)
    # Not connected yet: the stream opens and the request goes out at once,
    # in 0-RTT packets.
    echo!(conn, random_bytes(@early_request), 5_000)
    assert_receive {:quic_early_data, ^conn, :accepted}, 5_000
    assert {:ok, %{resumed: true, early_data: :accepted}} = Connection.info(conn)

    # Their side: only the second handshake resumed, it took 0-RTT, and all
    # of stream 0 (our request) came before it completed.
    await_lines(server, [
      ~r/^RESUMED$/,
      ~r/^EARLY_DATA accepted$/,
      ~r/^EARLY_STREAM 0 #{@early_request}$/
    ])

    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:resumption, peer, :server, _context) do
    {_listener, port} =
      our_listener(
        config_opts: [enable_early_data: true],
        handler_options: %{stream_states: true}
      )

    args = ["--resume", "--early-data", "--streams", "1", "--size", "#{@early_request}"]

    # Their client checked the echo byte for byte (else no `bytes`) and
    # reports its own view of the second connection.
    assert %{resumed: true, early_data: "accepted", bidi: 1, bytes: @early_request} =
             client!(peer, delay_proxy!(port), args)

    # Ours: a full handshake, then a resumed one that accepted 0-RTT (the
    # handler's handle_early_data/2 runs only when 0-RTT was offered), and
    # whose one stream opened while the handshake was under way.
    assert_receive {:matrix_connected, first, _}, 5_000
    assert_receive {:matrix_connected, second, _}, 5_000
    assert_receive {:matrix_early_data, ^second, :accepted, {:ok, info}}, 5_000
    assert %{resumed: true, early_data: :accepted} = info
    refute_received {:matrix_early_data, ^first, _, _}
    assert_received {:matrix_stream_opened, ^second, 0, :handshaking}
  end

  # --- migration: the client moves to a new local port halfway through a
  # 5 MB echo on one stream, with data in flight; the server follows, and
  # the echo is byte-exact.

  defp run(:migration, peer, :client, _context) do
    {server, port} = echo_server!(peer)
    conn = connect_to!(port)
    {:ok, %{local_address: old_local}} = Connection.info(conn)
    payload = random_bytes(@migration_size)
    half = div(@migration_size, 2)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)

    sender =
      Task.async(fn ->
        Quichex.Stream.send(stream, payload, fin: true, timeout: @transfer_timeout)
      end)

    # Half of the echo is back; the rest is on its way both ways.
    first = read_at_least(stream, half, [])
    assert {:ok, path_id} = Connection.migrate(conn, {{127, 0, 0, 1}, 0}, nil, timeout: 10_000)
    second = read_bytes(stream, @migration_size - byte_size(first), true, [])
    assert Task.await(sender, @transfer_timeout) == :ok
    assert first <> second == payload

    assert_receive {:quic_path_validated, ^conn, ^path_id}
    assert {:ok, %{local_address: new_local}} = Connection.info(conn)
    assert new_local != old_local
    assert {:ok, %{id: ^path_id, active: true}} = Connection.active_path(conn)

    # quinn_peer's server saw the client's address change.
    [_, from, to] = Interop.await_line(server, ~r/^MIGRATED (\S+) (\S+)$/)
    assert {from, to} == {format_address(old_local), format_address(new_local)}
    :ok = Connection.close(conn, error_code: 0, reason: "done")
  end

  defp run(:migration, peer, :server, _context) do
    {_listener, port} = our_listener()
    args = ["--streams", "1", "--size", "#{@migration_size}", "--rebind"]
    result = client!(peer, port, args, @transfer_timeout)

    # --rebind: once the first half was written, their endpoint moved to a
    # new socket; the second half went from there.
    assert %{bidi: 1, bytes: @migration_size, rebind_from: from, rebind_to: to} = result
    assert from != to
    # Our connection followed it (handle_path_event/3).
    assert_receive {:matrix_path_event, _conn,
                    {:peer_migrated, {{127, 0, 0, 1}, ^from}, {{127, 0, 0, 1}, ^to}}},
                   5_000
  end

  ## Our side

  # A listener on 127.0.0.1 running MatrixHandler. Options: :alpn,
  # :config_opts, :handler_options (merged into %{test: self()}), and any
  # Quichex.Listener option (handler: nil for active mode).
  defp our_listener(opts \\ []) do
    {alpn, opts} = Keyword.pop(opts, :alpn, alpn())
    {config_opts, opts} = Keyword.pop(opts, :config_opts, [])
    {handler_options, opts} = Keyword.pop(opts, :handler_options, %{})

    opts =
      Keyword.merge(
        [
          handler: MatrixHandler,
          handler_options: Map.merge(%{test: self(), silent: false}, handler_options),
          config_opts: [application_protos: [alpn]] ++ config_opts
        ],
        opts
      )

    {listener, port} = start_listener(opts)
    on_exit(fn -> if Process.alive?(listener), do: Listener.stop(listener) end)
    {listener, port}
  end

  defp assert_version_negotiated(listener) do
    {:ok, stats} = Listener.stats(listener)
    assert stats.version_negotiation >= 1, "no Version Negotiation sent: #{inspect(stats)}"
    assert stats.accepted >= 1, inspect(stats)
  end

  # Our client, to 127.0.0.1 ("localhost" is the certificate's name).
  # `opts`: more Connection.connect/1 options, and `wait: false` to return
  # before the handshake completes.
  defp connect_to!(port, config_opts \\ [], opts \\ []) do
    {wait, opts} = Keyword.pop(opts, :wait, true)

    {:ok, conn} =
      Connection.connect(
        [
          host: {127, 0, 0, 1},
          port: port,
          server_name: "localhost",
          local_address: {127, 0, 0, 1},
          config: client_config(config_opts),
          stream_opts: [active: false]
        ] ++ opts
      )

    case wait && Connection.wait_connected(conn, timeout: 5_000) do
      false -> conn
      :ok -> conn
      error -> flunk("our client did not connect: #{inspect(error)}")
    end
  end

  # Sends `payload` with FIN on a new stream (from a task) and checks the
  # echo. Returns the elapsed milliseconds.
  defp echo!(conn, payload, timeout) do
    started = now()

    case echo_result(conn, payload, timeout) do
      {:ok, ^payload} ->
        now() - started

      {:ok, other} ->
        prefix = :binary.longest_common_prefix([other, payload])

        flunk(
          "the echo differs: #{byte_size(other)} bytes for #{byte_size(payload)} sent, " <>
            "first difference at byte #{prefix}"
        )

      error ->
        flunk("echo of #{byte_size(payload)} bytes failed: #{inspect(error, limit: 10)}")
    end
  end

  defp echo_result(conn, payload, timeout) do
    deadline = now() + timeout

    with {:ok, stream} <-
           Connection.open_stream(conn, :bidirectional, timeout: timeout, active: false) do
      sender =
        Task.async(fn -> Quichex.Stream.send(stream, payload, fin: true, timeout: timeout) end)

      read = read_all(stream, max(deadline - now(), 0))
      sent = Task.yield(sender, max(deadline - now(), 0) + 2_000) || Task.shutdown(sender)

      case {read, sent} do
        {{:ok, _} = ok, {:ok, :ok}} -> ok
        _ -> {:error, read: read, send: sent}
      end
    end
  end

  # At least `n` bytes (no FIN yet), as many as came.
  defp read_at_least(stream, n, acc) do
    case Quichex.Stream.recv(stream, timeout: 10_000) do
      {:ok, data, false} ->
        acc = [acc | data]

        if IO.iodata_length(acc) >= n,
          do: IO.iodata_to_binary(acc),
          else: read_at_least(stream, n, acc)

      other ->
        flunk("read failed before #{n} bytes: #{inspect(other)}")
    end
  end

  defp read_bytes(stream, left, fin, acc) do
    case Quichex.Stream.recv(stream, timeout: 10_000) do
      {:ok, data, got_fin} ->
        acc = [acc | data]
        left = left - IO.iodata_length(data)

        cond do
          left < 0 -> flunk("#{-left} bytes more than were sent")
          left == 0 and got_fin == fin -> IO.iodata_to_binary(acc)
          got_fin -> flunk("FIN with #{left} bytes still to come")
          true -> read_bytes(stream, left, fin, acc)
        end

      error ->
        flunk("read failed with #{left} bytes to come: #{inspect(error)}")
    end
  end

  # Reads a passive stream until FIN, an error, the deadline or @max_reads.
  defp read_all(stream, timeout) do
    deadline = now() + timeout

    Enum.reduce_while(1..@max_reads, [], fn _, acc ->
      remaining = deadline - now()

      if remaining <= 0 do
        {:halt, {:error, {:deadline, IO.iodata_length(acc)}}}
      else
        case Quichex.Stream.recv(stream, timeout: remaining) do
          {:ok, data, true} -> {:halt, {:ok, IO.iodata_to_binary([acc | data])}}
          {:ok, data, false} -> {:cont, [acc | data]}
          {:error, reason} -> {:halt, {:error, {reason, IO.iodata_length(acc)}}}
        end
      end
    end)
    |> case do
      {:ok, _} = ok -> ok
      {:error, _} = error -> error
      _acc -> {:error, :too_many_reads}
    end
  end

  # Collects an active-mode stream until the peer's FIN, then echoes it all
  # with FIN.
  defp echo_active(conn, stream, acc \\ [], chunks \\ 0) do
    if chunks > 10_000, do: flunk("too many chunks on one stream")

    receive do
      {:quic_stream, ^conn, ^stream, data} ->
        echo_active(conn, stream, [acc | data], chunks + 1)

      {:quic_stream_fin, ^conn, ^stream} ->
        :ok = Quichex.Stream.send(stream, acc, fin: true)
    after
      5_000 -> flunk("the client's stream did not finish within 5 s")
    end
  end

  # Adds {:quic_dgram, conn, data} messages to `acc` (newest first) until it
  # holds `target` of them or none came for `quiet` ms.
  defp receive_dgrams(conn, acc, target, quiet) do
    if is_integer(target) and length(acc) >= target do
      acc
    else
      receive do
        {:quic_dgram, ^conn, data} -> receive_dgrams(conn, [data | acc], target, quiet)
      after
        quiet -> acc
      end
    end
  end

  # Every echo is a datagram we sent, byte for byte, at most once, and
  # enough of them came back.
  defp assert_dgram_echoes(sent, echoes) do
    by_index = Map.new(sent, fn <<i::32, _::binary>> = d -> {i, d} end)

    strangers =
      Enum.reject(echoes, fn
        <<i::32, _::binary>> = d -> by_index[i] == d
        _ -> false
      end)

    dups = for {d, n} <- Enum.frequencies(echoes), n > 1, do: d

    assert strangers == [],
           "#{length(strangers)} echoes are not datagrams we sent, sizes " <>
             inspect(Enum.map(strangers, &byte_size/1))

    assert dups == [], "#{length(dups)} datagrams came back more than once"

    assert length(echoes) >= @dgram_min_echoed,
           "only #{length(echoes)} of #{length(sent)} datagrams came back"
  end

  defp flush_messages(acc \\ []) do
    receive do
      msg -> flush_messages([msg | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  # A proxy to 127.0.0.1:`port` that delays every datagram by @early_delay
  # ms each way. Returns its port.
  defp delay_proxy!(port) do
    {:ok, _proxy, proxy_port} =
      Quichex.Test.FaultProxy.start_link(
        upstream: {{127, 0, 0, 1}, port},
        delay: 1.0,
        delay_ms: {@early_delay, @early_delay}
      )

    proxy_port
  end

  ## Their side

  defp echo_server!(peer, args \\ []),
    do: Interop.start_peer_server!(peer, ["--alpn", alpn() | args])

  defp run_client(peer, port, args, timeout) do
    Interop.run_peer_client!(peer, port, ["--alpn", alpn() | args], timeout)
  end

  # Runs their client to the end; it must exit 0 with "ok": true.
  defp client!(peer, port, args, timeout \\ 10_000) do
    check_client!(run_client(peer, port, args, timeout))
  end

  defp check_client!({status, result}) do
    unless status == 0 and result.ok == true and result.error == nil do
      flunk("their client failed (exit status #{status}): #{inspect(result)}")
    end

    result
  end

  # Runs gtlsclient in a task; when our handler reports the handshake, we
  # close with H3_NO_ERROR and the client must see it and exit.
  defp ngtcp2_client_until_closed!(port, options, uris) do
    client = Task.async(fn -> Interop.run_ngtcp2_client!(port, options, uris, 15_000) end)

    conn =
      receive do
        {:matrix_connected, conn, "h3"} -> conn
      after
        10_000 ->
          {_, lines} = Task.await(client, 20_000)
          flunk("no h3 connection from gtlsclient: #{inspect(Enum.take(lines, -30))}")
      end

    :ok = Connection.close(conn, error_code: @h3_no_error, reason: "")
    {status, lines} = Task.await(client, 20_000)
    assert_line(lines, ~r/^QUIC handshake has completed$/)
    assert_line(lines, ~r/frm rx .*CONNECTION_CLOSE\(0x1d\) error_code=.*\(0x100\)/)
    assert status == 0, "gtlsclient exited with #{status}: #{inspect(Enum.take(lines, -30))}"
    lines
  end

  # Waits for one line of `peer` matching each regex, in any order.
  defp await_lines(peer, regexes, timeout \\ 5_000)

  defp await_lines(_peer, [], _timeout), do: :ok

  defp await_lines(peer, regexes, timeout) do
    any = Regex.compile!(Enum.map_join(regexes, "|", &"(?:#{Regex.source(&1)})"))
    [line | _] = Interop.await_line(peer, any, timeout)
    await_lines(peer, Enum.reject(regexes, &Regex.match?(&1, line)), timeout)
  end

  defp assert_line(lines, regex) do
    assert Enum.any?(lines, &Regex.match?(regex, &1)),
           "no line matching #{inspect(regex)} in: #{inspect(Enum.take(lines, -40), limit: 60)}"
  end

  # An address as quinn prints it: "127.0.0.1:4433".
  defp format_address({ip, port}), do: "#{:inet.ntoa(ip)}:#{port}"

  defp now, do: System.monotonic_time(:millisecond)
end
