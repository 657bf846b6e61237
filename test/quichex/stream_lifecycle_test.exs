defmodule Quichex.StreamLifecycleTest do
  # The stream lifecycle contract of Quichex.Stream's moduledoc: the end of a
  # stream is never late or lost, a :gen_tcp-style loop works to the last
  # message, acknowledged data survives its sender, stream credit always
  # comes back, and owners hear of a dying connection.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}

  defmodule Echo do
    use Quichex.Handler

    # A send fails only when the client went away (a test killed it).
    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      case Quichex.Stream.send(stream, data, timeout: 30_000) do
        :ok -> {:continue, state}
        {:error, _} -> {:close, state}
      end
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      :ok = Quichex.Stream.close(stream)
      {:close, state}
    end
  end

  # Answers a request once it is whole: the reply, then close/1 in a
  # separate call (an empty FIN written after the data).
  defmodule ReplyThenClose do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_stream_open(_stream, _opts), do: {:continue, []}

    @impl Quichex.Handler
    def handle_data(data, _stream, acc), do: {:continue, [acc | data]}

    @impl Quichex.Handler
    def handle_fin(stream, acc) do
      :ok = Quichex.Stream.send(stream, ["reply:" | acc])
      :ok = Quichex.Stream.close(stream)
      {:close, acc}
    end
  end

  # Replies with the FIN in the same call as the data (one packet).
  defmodule ReplyWithFin do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      :ok = Quichex.Stream.send(stream, data, fin: true)
      {:continue, state}
    end
  end

  # Reports every whole request (and each stream's callbacks) to the test.
  defmodule Collector do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_stream_open(_stream, %{test: test}), do: {:continue, %{test: test, acc: []}}

    @impl Quichex.Handler
    def handle_data(data, _stream, state), do: {:continue, %{state | acc: [state.acc | data]}}

    @impl Quichex.Handler
    def handle_fin(_stream, state) do
      send(state.test, {:request, IO.iodata_to_binary(state.acc)})
      {:close, state}
    end

    @impl Quichex.Handler
    def handle_reset(code, _stream, state) do
      send(state.test, {:handle_reset, code})
      {:close, state}
    end

    @impl Quichex.Handler
    def handle_stopped(code, _stream, state) do
      send(state.test, {:handle_stopped, code})
      {:continue, state}
    end
  end

  # Starts a send the client never reads, so it blocks on flow control.
  defmodule BlockedSender do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(_data, stream, %{test: test} = state) do
      send(test, {:sending, self()})

      case Quichex.Stream.send(stream, :binary.copy("b", 8_000_000), timeout: 30_000) do
        :ok -> {:continue, state}
        {:error, reason} -> send(test, {:send_failed, reason}) && {:close, state}
      end
    end
  end

  defp listener!(opts) do
    {listener, port} = start_listener(opts)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  defp handler!(handler, options \\ %{}, opts \\ []) do
    listener!([handler: handler, handler_options: options] ++ opts)
  end

  defp read_all(stream, acc \\ []) do
    case Stream.recv(stream, timeout: 10_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data])}
      {:ok, data, false} -> read_all(stream, [acc | data])
      error -> error
    end
  end

  describe "the end of a stream is never late or lost" do
    test "1,000 request/response rounds where the reply's FIN is written on its own" do
      {_listener, port} = handler!(ReplyThenClose)
      conn = connect!(port)

      for i <- 1..1_000 do
        {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
        :ok = Stream.send(stream, "request #{i}", fin: true)
        assert {:ok, "reply:request #{i}"} == read_all(stream)
      end
    end

    test "a FIN written with close/1 reaches the peer in the same driver pass" do
      {listener, port} = listener!(stream_opts: [active: true])
      conn = connect!(port)
      server = accept!(listener)

      # Idle connection, nothing in flight: the FIN must not wait for a
      # timer. A timer would delay every round (the old workaround held
      # each FIN 50 ms); a busy machine delays only some, so the fastest
      # of five rounds is what is bounded.
      times =
        for _round <- 1..5 do
          {:ok, stream} = Connection.open_stream(conn)
          :ok = Stream.send(stream, "data")
          assert_receive {:quic_stream_opened, ^server, peer, :bidirectional}, 5_000
          assert_receive {:quic_stream, ^server, ^peer, "data"}, 5_000

          started = System.monotonic_time(:microsecond)
          :ok = Stream.close(stream)
          assert_receive {:quic_stream_fin, ^server, ^peer}, 5_000
          System.monotonic_time(:microsecond) - started
        end

      assert Enum.min(times) < 40_000, "the FINs took #{inspect(times)} µs"
    end
  end

  describe "receive loops run to the end" do
    setup do
      {_listener, port} = handler!(Echo)
      %{conn: connect!(port)}
    end

    defp echo_with(conn, size, active, loop) do
      payload = :crypto.strong_rand_bytes(size)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: active)

      sender =
        Task.async(fn ->
          for <<chunk::binary-size(65_536) <- payload>>,
            do: :ok = Stream.send(stream, chunk, timeout: 30_000)

          rest = binary_part(payload, div(size, 65_536) * 65_536, rem(size, 65_536))
          :ok = Stream.send(stream, rest, fin: true, timeout: 30_000)
        end)

      received = loop.(stream)
      assert :ok = Task.await(sender, 30_000)
      assert byte_size(received) == size
      assert received == payload
      stream
    end

    test "a :gen_tcp-style active: :once loop on a 20 MB echo", %{conn: conn} do
      stream =
        echo_with(conn, 20_000_000, :once, fn stream ->
          once_loop(stream, [])
        end)

      # Both directions done: the stream process ends on its own.
      eventually(fn -> not Process.alive?(stream) end)
    end

    test "active: n loops re-arming after :quic_stream_passive", %{conn: conn} do
      echo_with(conn, 5_000_000, 3, fn stream -> n_loop(stream, 3, []) end)
    end

    test "passive recv loops", %{conn: conn} do
      echo_with(conn, 5_000_000, false, fn stream ->
        {:ok, data} = read_all(stream)
        data
      end)
    end

    test "active: true delivers data, then the FIN, then the stream ends", %{conn: conn} do
      stream = echo_with(conn, 1_000_000, true, fn stream -> collect_true(stream, []) end)

      eventually(fn -> not Process.alive?(stream) end)
    end
  end

  defp once_loop(stream, acc) do
    receive do
      {:quic_stream, _conn, ^stream, data} ->
        # Re-arming must always work: the FIN notice waits for it.
        assert :ok = Stream.setopts(stream, active: :once)
        once_loop(stream, [acc | data])

      {:quic_stream_fin, _conn, ^stream} ->
        IO.iodata_to_binary(acc)
    after
      10_000 -> flunk("no message for 10 s")
    end
  end

  defp n_loop(stream, n, acc) do
    receive do
      {:quic_stream, _conn, ^stream, data} ->
        n_loop(stream, n, [acc | data])

      {:quic_stream_passive, _conn, ^stream} ->
        assert :ok = Stream.setopts(stream, active: n)
        n_loop(stream, n, acc)

      {:quic_stream_fin, _conn, ^stream} ->
        IO.iodata_to_binary(acc)
    after
      10_000 -> flunk("no message for 10 s")
    end
  end

  defp collect_true(stream, acc) do
    receive do
      {:quic_stream, _conn, ^stream, data} -> collect_true(stream, [acc | data])
      {:quic_stream_fin, _conn, ^stream} -> IO.iodata_to_binary(acc)
    after
      10_000 -> flunk("no message for 10 s")
    end
  end

  describe "a FIN arriving with the last data" do
    setup do
      {_listener, port} = handler!(ReplyWithFin)
      %{conn: connect!(port)}
    end

    test "active: :once holds the FIN notice until the next re-arm", %{conn: conn} do
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: :once)
      :ok = Stream.send(stream, "ping", fin: true)
      assert_receive {:quic_stream, ^conn, ^stream, "ping"}, 2_000
      refute_receive {:quic_stream_fin, ^conn, ^stream}, 50
      assert {:ok, %{id: 0}} = Stream.info(stream)
      assert :ok = Stream.setopts(stream, active: :once)
      assert_receive {:quic_stream_fin, ^conn, ^stream}, 2_000
      # Both directions done: the stream ends and answers :closed.
      eventually(fn -> not Process.alive?(stream) end)
      assert {:error, :closed} = Stream.setopts(stream, active: :once)
      assert {:error, :closed} = Stream.info(stream)
    end

    test "active: 1 sends the passive notice and holds the FIN", %{conn: conn} do
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: 1)
      :ok = Stream.send(stream, "ping", fin: true)
      assert_receive {:quic_stream, ^conn, ^stream, "ping"}, 2_000
      assert_receive {:quic_stream_passive, ^conn, ^stream}
      refute_receive {:quic_stream_fin, ^conn, ^stream}, 50
      assert :ok = Stream.setopts(stream, active: 1)
      assert_receive {:quic_stream_fin, ^conn, ^stream}, 2_000
    end

    test "passive recv returns the data with fin? = true", %{conn: conn} do
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      :ok = Stream.send(stream, "ping", fin: true)
      assert {:ok, "ping", true} = Stream.recv(stream, timeout: 2_000)
      eventually(fn -> not Process.alive?(stream) end)
      assert {:error, :closed} = Stream.recv(stream)
    end
  end

  test "streams are active by default, passive one option away" do
    {listener, port} = listener!([])
    conn = connect!(port)
    server = accept!(listener)

    {:ok, stream} = Connection.open_stream(conn)
    :ok = Stream.send(stream, "hi")
    assert_receive {:quic_stream_opened, ^server, peer, :bidirectional}
    assert_receive {:quic_stream, ^server, ^peer, "hi"}
    assert {:error, :active} = Stream.recv(peer)

    {:ok, passive} = Connection.open_stream(conn, :bidirectional, active: false)
    assert {:error, :timeout} = Stream.recv(passive, timeout: 10)

    # A connection started with active: false opens passive streams.
    quiet = connect!(port, active: false)
    {:ok, quiet_stream} = Connection.open_stream(quiet)
    assert {:error, :timeout} = Stream.recv(quiet_stream, timeout: 10)
  end

  describe "acknowledged data survives its sender" do
    test "a sender that exits right after send(..., fin: true) returned :ok, 100 times" do
      {_listener, port} = handler!(Collector, %{test: self()})
      conn = connect!(port)

      requests =
        for i <- 1..100 do
          size = if rem(i, 10) == 0, do: 2_000_000, else: 100 + i
          request = :crypto.strong_rand_bytes(size)

          # A fire-and-forget task: the stream's owner exits right after :ok.
          {pid, ref} =
            spawn_monitor(fn ->
              {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
              :ok = Stream.send(stream, request, fin: true, timeout: 20_000)
            end)

          assert_receive {:DOWN, ^ref, :process, ^pid, :normal}, 20_000
          request
        end

      received =
        for _ <- 1..100 do
          assert_receive {:request, request}, 20_000
          request
        end

      assert Enum.sort(received) == Enum.sort(requests)
    end
  end

  describe "stream credit always comes back" do
    test "the peer resets a stream while our handler is blocked sending, 100 times" do
      {_listener, port} =
        handler!(BlockedSender, %{test: self()}, config_opts: [initial_max_streams_bidi: 1])

      conn = connect!(port)

      for i <- 1..100 do
        started = System.monotonic_time(:millisecond)

        {:ok, stream} =
          Connection.open_stream(conn, :bidirectional, active: false, timeout: 5_000)

        waited = System.monotonic_time(:millisecond) - started
        # At once: never waiting for the handler's 30 s send timeout.
        assert waited < 2_000, "round #{i}: open_stream waited #{waited} ms"
        :ok = Stream.send(stream, "go")
        assert_receive {:sending, _handler}, 5_000
        :ok = Stream.shutdown(stream, :both, error_code: 7)
        assert_receive {:send_failed, {:stopped, 7}}, 5_000
      end
    end

    test "after a peer's reset and stop, the stream state is freed on both sides" do
      {listener, port} = listener!(config_opts: [initial_max_streams_bidi: 1])
      conn = connect!(port, stream_opts: [active: false])
      server = accept!(listener)

      for _ <- 1..20 do
        {:ok, stream} =
          Connection.open_stream(conn, :bidirectional, active: false, timeout: 5_000)

        :ok = Stream.send(stream, "x")
        assert_receive {:quic_stream_opened, ^server, peer, _}, 5_000
        :ok = Stream.shutdown(stream, :both, error_code: 3)
        assert_receive {:quic_stream_reset, ^server, ^peer, 3}, 5_000
        assert_receive {:quic_stream_stopped, ^server, ^peer, 3}, 5_000
        # Our side never answered: the peer's stop ended our sending side,
        # its reset our receiving side; the process ends and quiche frees it.
        eventually(fn -> not Process.alive?(peer) end)
      end
    end
  end

  test "the connection process killed with 50 streams open: every owner hears, nothing crashes" do
    {_listener, port} = handler!(Echo)
    conn = connect!(port)

    log =
      capture_log(fn ->
        streams =
          for _ <- 1..50 do
            {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
            :ok = Stream.send(stream, "hello")
            stream
          end

        Process.exit(conn, :kill)

        for stream <- streams do
          assert_receive {:quic_stream_closed, ^conn, ^stream, {:connection_down, :killed}}, 5_000
        end

        eventually(fn -> not Enum.any?(streams, &Process.alive?/1) end)
        # Give a crash report the time to reach the logger.
        Logger.flush()
      end)

    refute log =~ "CRASH REPORT"
    refute log =~ "terminating"
  end

  describe "shutdown(:both) is seen by the peer as both reset and stop" do
    setup do
      {_listener, port} = handler!(Collector, %{test: self()})
      %{conn: connect!(port)}
    end

    test "shutdown(:both)", %{conn: conn} do
      for _ <- 1..4 do
        {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
        :ok = Stream.send(stream, "x")
        :ok = Stream.shutdown(stream, :both, error_code: 9)
        assert_receive {:handle_reset, 9}, 5_000
        assert_receive {:handle_stopped, 9}, 5_000
      end
    end

    test ":read and :write back to back", %{conn: conn} do
      for _ <- 1..4 do
        {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
        :ok = Stream.send(stream, "x")
        :ok = Stream.shutdown(stream, :read, error_code: 4)
        :ok = Stream.shutdown(stream, :write, error_code: 5)
        assert_receive {:handle_reset, 5}, 5_000
        assert_receive {:handle_stopped, 4}, 5_000
      end
    end

    test "active mode owners get both messages", %{conn: _conn} do
      {listener, port} = listener!([])
      conn = connect!(port)
      server = accept!(listener)
      {:ok, stream} = Connection.open_stream(conn)
      :ok = Stream.shutdown(stream, :both, error_code: 11)
      assert_receive {:quic_stream_opened, ^server, peer, _}, 5_000
      assert_receive {:quic_stream_reset, ^server, ^peer, 11}, 5_000
      assert_receive {:quic_stream_stopped, ^server, ^peer, 11}, 5_000
    end
  end

  test "no FIN timers or workarounds are left in the code" do
    root = Path.expand("../..", __DIR__)

    files =
      Path.wildcard(Path.join(root, "lib/**/*.ex")) ++
        Path.wildcard(Path.join(root, "native/quichex_nif/src/*.rs"))

    assert files != []

    for file <- files, line <- File.stream!(file) do
      refute line =~ ~r/hold_ms|fin_grace|tx_fresh|fin_repoke/, "#{file}: #{line}"
    end
  end
end
