defmodule Quichex.APISafetyTest do
  # Issue 14, "every public function safe": a bad argument raises
  # ArgumentError in the caller (naming the option), a pid of the wrong kind
  # or a dead one gets {:error, reason} and the process it names carries
  # on, nothing else dies, nothing logs a crash report.
  #
  # Not async: a :logger handler watches every process for error reports.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Config, Connection, Listener, Stream, TransportError}
  alias Quichex.Config.Schema
  alias Quichex.Test.LogWatch

  @max Schema.max_timeout()

  defmodule Echo do
    # Echoes every stream and tells `notify` (the handler options) which
    # processes serve each connection and stream.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(conn, notify) do
      if is_pid(notify), do: send(notify, {:echo_connection, conn, self()})
      {:continue, notify}
    end

    @impl Quichex.Handler
    def handle_stream_open(stream, notify) do
      {:ok, %{connection: conn}} = Stream.info(stream)
      if is_pid(notify), do: send(notify, {:echo_stream, conn, stream})
      {:continue, notify}
    end

    @impl Quichex.Handler
    def handle_data(data, stream, notify) do
      # Calls under test may have shut this stream's sending side.
      _ = Stream.send(stream, data)
      {:continue, notify}
    end
  end

  setup do
    watch = LogWatch.start()
    on_exit(fn -> LogWatch.stop(watch) end)
    %{watch: watch}
  end

  defp world(context) do
    world = build_world()
    on_exit(fn -> Listener.stop(world.listener) end)
    Map.merge(context, world)
  end

  # A listener serving Echo, a client connection, and a stream on it (the
  # test process owns both), with the server's processes. The listener is
  # not linked to the test process: tests stop it, or it goes with the VM.
  defp build_world do
    {listener, port} = start_listener(handler: Echo, handler_options: self())
    Process.unlink(listener)
    conn = connect!(port)
    {:ok, [server_conn]} = Listener.connections(listener)
    assert_receive {:echo_connection, ^server_conn, handler_conn}
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    echo!(stream, "hello")
    assert_receive {:echo_stream, ^server_conn, handler_stream}
    %{socket: socket, connections: conns_sup} = Listener.children(listener)

    %{
      listener: listener,
      port: port,
      conn: conn,
      stream: stream,
      server_conn: server_conn,
      handler_conn: handler_conn,
      handler_stream: handler_stream,
      socket: socket,
      conns_sup: conns_sup
    }
  end

  defp echo!(stream, data) do
    assert :ok = Stream.send(stream, data)
    assert {:ok, ^data, false} = Stream.recv(stream, length: byte_size(data), timeout: 5_000)
  end

  # Every process of the world lives and works, and nothing logged an error.
  defp assert_working(w) do
    for key <- [:listener, :conn, :stream, :server_conn, :handler_conn, :handler_stream] do
      assert Process.alive?(w[key]), "#{key} died"
    end

    echo!(w.stream, "still there")
    {:ok, fresh} = Connection.open_stream(w.conn, :bidirectional, active: false)
    :ok = Stream.send(fresh, "ping", fin: true)
    assert read_to_end(fresh, "") == "ping"
    assert {:ok, %{connections: 1}} = Listener.stats(w.listener)
    assert_nothing_logged(w)
  end

  defp read_to_end(stream, acc) do
    case Stream.recv(stream, timeout: 5_000) do
      {:ok, data, true} -> acc <> data
      {:ok, data, false} -> read_to_end(stream, acc <> data)
    end
  end

  defp assert_nothing_logged(%{watch: watch}) do
    events = LogWatch.events(watch)
    assert events == [], Enum.map_join(events, "\n", &LogWatch.describe/1)
  end

  defp dead_pid do
    {pid, ref} = spawn_monitor(fn -> :ok end)
    assert_receive {:DOWN, ^ref, :process, ^pid, _}
    pid
  end

  # A pid on a node this one is not connected to.
  defp remote_pid do
    bin = :erlang.term_to_binary(self())
    node = Atom.to_string(node())
    other = String.duplicate("x", byte_size(node) - 8) <> "@nowhere"
    bin |> :binary.replace(node, other) |> :erlang.binary_to_term()
  end

  describe "timeouts" do
    setup :world

    test "beyond the maximum raise ArgumentError naming :timeout; nothing dies", w do
      for bad <- [@max + 1, 2 ** 32 - 1, 2 ** 32, 2 ** 62, -1, :foo, 1.5, nil] do
        calls = [
          fn -> Stream.send(w.stream, "x", timeout: bad) end,
          fn -> Stream.close(w.stream, timeout: bad) end,
          fn -> Stream.recv(w.stream, timeout: bad) end,
          fn -> Connection.info(w.conn, timeout: bad) end,
          fn -> Connection.stats(w.conn, timeout: bad) end,
          fn -> Connection.wait_connected(w.conn, timeout: bad) end,
          fn -> Connection.open_stream(w.conn, :bidirectional, timeout: bad) end,
          fn -> Connection.dgram_recv(w.conn, timeout: bad) end,
          fn -> Connection.close(w.conn, timeout: bad) end,
          fn -> Listener.stop(w.listener, bad) end
        ]

        for call <- calls do
          assert_raise ArgumentError, ~r/option :timeout: .*#{@max}/, call
        end
      end

      assert_working(w)
    end

    test "a :handshake_timeout beyond the maximum raises ArgumentError", w do
      for bad <- [@max + 1, 2 ** 62, -1, :foo] do
        assert_raise ArgumentError, ~r/option :handshake_timeout/, fn ->
          Connection.connect(
            host: "localhost",
            port: w.port,
            config: client_config(),
            handshake_timeout: bad
          )
        end

        assert_raise ArgumentError, ~r/option :handshake_timeout/, fn ->
          Listener.start_link(config: server_config(), handshake_timeout: bad)
        end
      end

      assert_working(w)
    end

    test "the maximum is taken by every call and every timer", w do
      assert :ok = Connection.wait_connected(w.conn, timeout: @max)
      assert {:ok, %{alpn: _}} = Connection.info(w.conn, timeout: @max)
      assert {:ok, %{rtt: _}} = Connection.stats(w.conn, timeout: @max)
      assert {:ok, [_ | _]} = Connection.paths(w.conn, timeout: @max)

      {:ok, stream} = Connection.open_stream(w.conn, :bidirectional, timeout: @max, active: false)

      assert :ok = Stream.send(stream, "abc", timeout: @max)
      assert {:ok, "abc", false} = Stream.recv(stream, length: 3, timeout: @max)
      assert :ok = Stream.close(stream, timeout: @max)
      assert {:ok, "", true} = Stream.recv(stream, timeout: @max)

      # Handshake timers armed with the maximum, on both sides.
      {listener, port} =
        start_listener(handler: Echo, handler_options: nil, handshake_timeout: @max)

      conn = connect!(port, handshake_timeout: @max)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      echo!(stream, "max")
      assert :ok = Connection.close(conn, timeout: @max)
      assert :ok = Listener.stop(listener, @max)
      assert_working(w)
    end

    test "a huge max_idle_timeout never reaches a timer that cannot take it", w do
      huge = Schema.max_varint()

      {listener, port} =
        start_listener(handler: Echo, handler_options: nil, config_opts: [max_idle_timeout: huge])

      conn = connect!(port, config_opts: [max_idle_timeout: huge])
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      echo!(stream, "idle")
      assert :ok = Connection.close(conn)
      assert :ok = Listener.stop(listener)
      assert_working(w)
    end
  end

  describe ":stream_opts" do
    setup :world

    test "a bad value raises ArgumentError naming :stream_opts", w do
      for bad <- [:foo, "x", [foo: 1], [active: :bad], [active: 0], [active: true, active: false]] do
        assert_raise ArgumentError, ~r/option :stream_opts/, fn ->
          Connection.connect(
            host: "localhost",
            port: w.port,
            config: client_config(),
            stream_opts: bad
          )
        end

        assert_raise ArgumentError, ~r/option :stream_opts/, fn ->
          Listener.start_link(config: server_config(), stream_opts: bad)
        end
      end

      assert_working(w)
    end
  end

  describe "a pid of the wrong kind" do
    setup :world

    test "Connection functions answer {:error, :not_a_connection}", w do
      for pid <- [w.stream, w.handler_stream, w.handler_conn, w.listener, w.socket, w.conns_sup] do
        calls = [
          fn -> Connection.info(pid) end,
          fn -> Connection.stats(pid) end,
          fn -> Connection.wait_connected(pid) end,
          fn -> Connection.session(pid) end,
          fn -> Connection.paths(pid) end,
          fn -> Connection.active_path(pid) end,
          fn -> Connection.path_stats(pid, 0) end,
          fn -> Connection.rotate_cid(pid) end,
          fn -> Connection.migrate(pid, {{127, 0, 0, 1}, 0}) end,
          fn -> Connection.probe_path(pid, {{127, 0, 0, 1}, 0}, nil) end,
          fn -> Connection.dgram_send(pid, "x") end,
          fn -> Connection.dgram_max_size(pid) end,
          fn -> Connection.dgram_recv(pid, timeout: 0) end,
          fn -> Connection.readable_streams(pid) end,
          fn -> Connection.writable_streams(pid) end,
          fn -> Connection.open_stream(pid) end,
          fn -> Connection.controlling_process(pid, self()) end,
          fn -> Connection.close(pid) end
        ]

        for call <- calls, do: assert({:error, :not_a_connection} = call.())
        refute Connection.is_established?(pid)
        refute Connection.is_draining?(pid)
        assert Connection.is_closed?(pid)
      end

      assert_working(w)
    end

    test "Stream functions answer {:error, :not_a_stream}", w do
      for pid <- [w.conn, w.server_conn, w.handler_conn, w.listener, w.socket, w.conns_sup] do
        calls = [
          fn -> Stream.send(pid, "x") end,
          fn -> Stream.send(pid, "x", fin: true) end,
          fn -> Stream.close(pid) end,
          fn -> Stream.recv(pid, timeout: 0) end,
          fn -> Stream.setopts(pid, active: :once) end,
          fn -> Stream.setopts(pid, []) end,
          fn -> Stream.shutdown(pid, :both) end,
          fn -> Stream.set_priority(pid, urgency: 1) end,
          fn -> Stream.controlling_process(pid, self()) end,
          fn -> Stream.info(pid) end
        ]

        for call <- calls, do: assert({:error, :not_a_stream} = call.())
      end

      assert_working(w)
    end

    test "Listener functions answer {:error, :not_a_listener}", w do
      for pid <- [w.conn, w.stream, w.handler_conn, w.socket, w.conns_sup, self()] do
        assert {:error, :not_a_listener} = Listener.sockname(pid)
        assert {:error, :not_a_listener} = Listener.stats(pid)
        assert {:error, :not_a_listener} = Listener.connections(pid)
        assert {:error, :not_a_listener} = Listener.stop(pid)
      end

      assert_working(w)
    end

    test "Connection.info/1 of a stream and Stream.info/1 of a connection are errors", w do
      assert {:error, :not_a_connection} = Connection.info(w.stream)
      assert {:error, :not_a_stream} = Stream.info(w.conn)
      assert {:error, :not_a_stream} = Stream.info(w.server_conn)
      assert_working(w)
    end

    test "the caller itself is no connection nor stream; a dead pid is closed", w do
      assert {:error, :not_a_connection} = Connection.info(self())
      assert {:error, :not_a_stream} = Stream.info(self())
      dead = dead_pid()
      assert {:error, :closed} = Connection.info(dead)
      assert {:error, :closed} = Stream.info(dead)
      assert {:error, :closed} = Listener.sockname(dead)
      assert :ok = Connection.close(dead)
      assert :ok = Listener.stop(dead)
      assert_working(w)
    end
  end

  describe "Listener.stop/2" do
    setup :world

    test "stops only listeners", w do
      for pid <- [w.conn, w.stream, w.server_conn, w.socket, w.conns_sup] do
        assert {:error, :not_a_listener} = Listener.stop(pid)
      end

      assert_working(w)
    end

    test "a bad timeout raises ArgumentError and the listener keeps running", w do
      for bad <- [:foo, -1, 2 ** 62, @max + 1] do
        assert_raise ArgumentError, ~r/:timeout/, fn -> Listener.stop(w.listener, bad) end
      end

      assert {:ok, {_, port}} = Listener.sockname(w.listener)
      assert port == w.port
      assert_working(w)
    end

    test "stops a listener, and again is :ok", w do
      ref = Process.monitor(w.listener)
      assert :ok = Listener.stop(w.listener)
      assert_receive {:DOWN, ^ref, :process, _, :normal}
      assert :ok = Listener.stop(w.listener)
      assert {:error, :closed} = Listener.stats(w.listener)
      assert_nothing_logged(w)
    end
  end

  describe "controlling_process/2" do
    setup :world

    test "a dead owner is refused for a connection and nothing changes", w do
      for owner <- [dead_pid(), remote_pid()] do
        assert {:error, :dead_owner} = Connection.controlling_process(w.conn, owner)
      end

      assert_working(w)
      # Still ours to hand over.
      assert :ok = Connection.controlling_process(w.conn, self())
    end

    test "a dead owner is refused for a stream and nothing changes", w do
      for owner <- [dead_pid(), remote_pid()] do
        assert {:error, :dead_owner} = Stream.controlling_process(w.stream, owner)
      end

      assert_working(w)
      assert :ok = Stream.controlling_process(w.stream, self())
    end
  end

  describe "bad arguments" do
    setup :world

    test "Connection.close/2 raises ArgumentError for a bad pid or option", w do
      assert_raise ArgumentError, ~r/connection pid/, fn -> Connection.close(:foo) end

      assert_raise ArgumentError, ~r/option :timeout/, fn ->
        Connection.close(w.conn, timeout: :foo)
      end

      assert_raise ArgumentError, ~r/keyword list/, fn -> Connection.close(w.conn, :foo) end

      assert_raise ArgumentError, ~r/option :error_code/, fn ->
        Connection.close(w.conn, error_code: -1)
      end

      assert_working(w)
    end

    test "options that are not a keyword list raise ArgumentError", w do
      for call <- [
            fn -> Stream.send(w.stream, "x", :foo) end,
            fn -> Stream.recv(w.stream, %{timeout: 1}) end,
            fn -> Stream.setopts(w.stream, :once) end,
            fn -> Connection.info(w.conn, [:timeout]) end,
            fn -> Connection.open_stream(w.conn, :bidirectional, "x") end
          ] do
        assert_raise ArgumentError, ~r/keyword list/, call
      end

      assert_working(w)
    end

    test "Config.get/2 of an unknown key raises ArgumentError naming it" do
      assert_raise ArgumentError, ~r/:unknown/, fn -> Config.get(Config.new(), :unknown) end
    end

    test "a bad :server_name or :host raises ArgumentError and logs nothing", w do
      for name <- ["", <<255, 254>>, "a\0b", String.duplicate("a", 256)] do
        assert_raise ArgumentError, ~r/option :server_name/, fn ->
          Connection.connect(
            host: "localhost",
            port: w.port,
            config: client_config(),
            server_name: name
          )
        end
      end

      for host <- [<<255>>, "a\0b", "", nil, 42] do
        assert_raise ArgumentError, ~r/option :host/, fn ->
          Connection.connect(host: host, port: w.port, config: client_config())
        end
      end

      assert_working(w)
    end

    test "Listener.start_link/1 on a port in use is an error, with no log and no exit signal",
         w do
      assert {:error, %TransportError{reason: {:socket, :eaddrinuse}}} =
               Listener.start_link(ip: {127, 0, 0, 1}, port: w.port, config: server_config())

      # No exit signal reached this (not trapping) process: it is still here.
      assert_working(w)
    end

    test "recv/2 may wait for any length without hurting its connection", w do
      for length <- [2 ** 64, 2 ** 70] do
        assert {:error, :timeout} = Stream.recv(w.stream, length: length, timeout: 50)
      end

      assert_working(w)
    end
  end
end
