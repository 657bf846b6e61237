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

  defmodule Holder do
    # A Quichex.ConnectionHandler whose callback keeps running (in the
    # process the listener starts for it) while its connection lives.
    @behaviour Quichex.ConnectionHandler

    @impl Quichex.ConnectionHandler
    def handle_connection(conn, _peer) do
      if pid = Process.whereis(Quichex.APISafetyTest), do: send(pid, {:holder, conn, self()})
      ref = Process.monitor(conn)

      receive do
        {:DOWN, ^ref, :process, _, _} -> :ok
      end
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
  # No idle timeout: under `make soak` the property keeps a world for
  # longer than the default 30 s without traffic.
  @no_idle [config_opts: [max_idle_timeout: 0]]

  defp build_world do
    {listener, port} = start_listener([handler: Echo, handler_options: self()] ++ @no_idle)
    Process.unlink(listener)
    conn = connect!(port, @no_idle)
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

  ## The property: every public function, random arguments, every kind of pid

  @modules [Quichex, Config, Connection, Stream, Listener]

  # Every function of @modules (`__info__(:functions)`, so a new one is
  # called without touching this test) but these, each @doc false (checked
  # by the first test below):
  @excluded [
    # Starts a connection process from the argument map connect/1 and the
    # listener build: a random map would crash that process as it starts.
    {Connection, :start_link, 1},
    # The transport of every Connection function, which validates the
    # timeout it hands over first (a grace is added to it).
    {Connection, :call, 3},
    {Connection, :call, 4},
    # The Supervisor callback the listener process runs as it starts.
    {Listener, :init, 1}
  ]

  # Functions that take no process (Config functions take none either).
  @no_process [
    {Quichex, :quiche_version, 0},
    {Quichex, :connect, 3},
    {Quichex, :connect, 4},
    {Quichex, :child_spec, 1},
    {Connection, :connect, 1},
    {Connection, :child_spec, 1},
    {Connection, :stream_active!, 2},
    {Stream, :owner_down_error_code, 0},
    {Stream, :validate_active!, 1},
    {Stream, :priority!, 1},
    {Listener, :start_link, 1},
    {Listener, :child_spec, 1}
  ]

  # Functions that change nothing: called on a process of their kind, that
  # process must live on as well.
  @read_only [
    :info,
    :stats,
    :paths,
    :active_path,
    :path_stats,
    :session,
    :dgram_max_size,
    :readable_streams,
    :writable_streams,
    :wait_connected,
    :is_established?,
    :is_draining?,
    :is_closed?,
    :readable?,
    :sockname,
    :connections,
    :children
  ]

  # The processes calls are given, by name: {group, kind}. Group 1 is a
  # listener with a Quichex.Handler, a client connection and stream, and
  # the server's processes; group 2 a listener with a
  # Quichex.ConnectionHandler whose callback process keeps running.
  @victims %{
    listener: {1, :listener},
    conn: {1, :connection},
    stream: {1, :stream},
    server_conn: {1, :connection},
    handler_conn: {1, :handler},
    handler_stream: {1, :stream},
    socket: {1, :listener_socket},
    conns_sup: {1, :listener_connections},
    listener2: {2, :listener},
    conn2: {2, :connection},
    server_conn2: {2, :connection},
    runner: {2, :runner}
  }

  @calls_per_case 4
  # Ten times as many under `make soak` (QUICHEX_SOAK=full).
  @cases Quichex.Test.Soak.size(2_500, 250)
  # How long a call that may rightly wait (on a process of its kind, or one
  # that never answers) is watched before it is stopped; how long any
  # other call may take on a busy machine.
  @watch_waiting 200
  @must_answer 5_000

  test "the property leaves out only what is @doc false, for a reason" do
    # A function with default arguments has one doc entry, under its
    # highest arity.
    hidden =
      for mod <- @modules,
          {:docs_v1, _, _, _, _, _, docs} = Code.fetch_docs(mod),
          {{:function, name, arity}, _, _, :hidden, meta} <- docs,
          arity <- (arity - Map.get(meta, :defaults, 0))..arity,
          do: {mod, name, arity}

    for mfa <- @excluded, do: assert(mfa in hidden, "#{inspect(mfa)} is public")
    assert length(functions()) > 100
  end

  @tag timeout: 300_000
  test "property: every public function, given random terms and pids of every kind, " <>
         "returns {:error, _} or raises ArgumentError, and nothing else dies or logs",
       ctx do
    Process.register(self(), __MODULE__)
    bystanders = build_world()
    Process.put(:groups, %{1 => build_world(), 2 => build_group2()})
    LogWatch.clear(ctx.watch)
    Process.put(:counts, %{})

    property =
      :proper.forall(:proper_types.vector(@calls_per_case, call_gen()), fn calls ->
        Enum.all?(calls, &safe_call?(&1, bystanders, ctx.watch))
      end)

    result =
      :proper.quickcheck(property, [
        :quiet,
        {:numtests, @cases},
        {:max_shrinks, 20},
        {:on_output, fn _, _ -> :ok end}
      ])

    unless result == true do
      flunk("""
      #{Process.get(:failure)}
      counterexample: #{inspect(:proper.counterexample(), limit: 30)}
      """)
    end

    # The bystanders, never given to any call, still work; so did the
    # calls cover every function.
    bystanders = Map.put(bystanders, :watch, ctx.watch)
    assert_working(bystanders)
    counts = Process.get(:counts)
    missed = Enum.reject(functions(), &Map.has_key?(counts, &1))
    assert length(missed) < length(functions()) / 10, "never called: #{inspect(missed)}"

    for world <- Map.values(Process.get(:groups)), do: stop_group(world)
    Listener.stop(bystanders.listener)
  end

  # `__struct__/0,1` come with defstruct: the %Quichex.Config{} syntax, not
  # functions to call.
  defp functions do
    for mod <- @modules,
        {name, arity} <- mod.__info__(:functions),
        name != :__struct__,
        {mod, name, arity} not in @excluded,
        do: {mod, name, arity}
  end

  ## Generators (symbolic: pids are resolved when a call runs)

  # Functions are drawn module by module, so that the many Config setters
  # do not crowd out the process functions.
  @module_weights [{Connection, 4}, {Stream, 3}, {Listener, 2}, {Config, 2}, {Quichex, 1}]

  defp call_gen do
    by_module = Enum.group_by(functions(), &elem(&1, 0))

    functions =
      :proper_types.frequency(
        for {mod, weight} <- @module_weights,
            do: {weight, :proper_types.elements(Map.fetch!(by_module, mod))}
      )

    :proper_types.bind(functions, &args_gen/1, false)
  end

  defp args_gen({_mod, _name, arity} = mfa) do
    target = target(mfa)

    args =
      for i <- 0..(arity - 1)//1 do
        case target do
          {^i, kind} -> target_gen(kind)
          _ when i == 0 -> first_gen()
          _ -> arg_gen()
        end
      end

    :proper_types.tuple([mfa, :proper_types.fixed_list(args)])
  end

  # The argument naming the process a function acts on, and its kind.
  defp target({mod, _, _}) when mod in [Quichex, Config], do: nil
  defp target(mfa) when mfa in @no_process, do: nil

  defp target({Connection, name, _}) do
    # The plan's stream functions take the connection, unchecked, then the stream.
    if String.starts_with?(Atom.to_string(name), "stream_"),
      do: {1, :stream},
      else: {0, :connection}
  end

  defp target({Stream, _, _}), do: {0, :stream}
  defp target({Listener, _, _}), do: {0, :listener}

  defp pid_gen(names), do: :proper_types.elements(for name <- names, do: {:"$pid", name})

  defp target_gen(kind) do
    {right, wrong} = @victims |> Map.keys() |> Enum.split_with(&(kind_of(&1) == kind))

    :proper_types.frequency([
      {1, pid_gen(right)},
      {6, pid_gen(wrong -- [:runner])},
      {2, pid_gen([:dead, :remote, :self])},
      {1, pid_gen([:runner, :test])},
      {2, value_gen()}
    ])
  end

  defp first_gen do
    :proper_types.frequency([
      {3, config_gen()},
      {3, value_gen()},
      {2, opts_gen()},
      {1, pid_gen(Map.keys(@victims))}
    ])
  end

  defp arg_gen do
    :proper_types.frequency([
      {4, value_gen()},
      {4, opts_gen()},
      {1, pid_gen(Map.keys(@victims) ++ [:dead, :self])},
      {1, config_gen()}
    ])
  end

  defp config_gen, do: :proper_types.elements([{:"$config", :client}, {:"$config", :server}])

  # Values at the limits the API has, and of every type it takes.
  @values Enum.concat([
            [-1, 0, 1, 50, 255, 65_535, 65_536, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 64],
            [@max, @max + 1, 2 ** 70, -(2 ** 64), 1.5, :infinity, :foo, nil, true, false],
            [:once, :read, :write, :both, :bidirectional, :unidirectional, :client, :server],
            [:unknown, :application_protos, :max_idle_timeout, :cc_algorithm],
            ["", "x", "hello", <<255, 254>>, "a\0b", "localhost", "127.0.0.1"],
            [[], {}, %{}, {1, 2}, [1, 2], ["h3"], [foo: 1], [active: :once], [urgency: 9]],
            [[urgency: 1, incremental: false], {127, 0, 0, 1}, {:a, :b, :c, :d}],
            [{{127, 0, 0, 1}, 0}, {{127, 0, 0, 1}, 70_000}, {{0, 0, 0, 0, 0, 0, 0, 1}, 0}]
          ])

  defp value_gen do
    :proper_types.frequency([
      {8, :proper_types.elements(@values)},
      {1, :proper_types.integer()},
      {1, :proper_types.binary()},
      {1, :proper_types.list(:proper_types.elements(@values))},
      {1, :proper_types.tuple([:proper_types.elements(@values)])}
    ])
  end

  @option_keys [:timeout, :fin, :length, :active, :error_code, :reason, :priority, :urgency] ++
                 [:incremental, :stream_opts, :handshake_timeout, :host, :port, :config] ++
                 [:server_name, :local_port, :local_address, :session, :early_data] ++
                 [:handler, :connection_handler, :max_connections, :retry, :owner, :ip] ++
                 [:recv_queue_len, :send_queue_len, :foo]

  defp opts_gen do
    option =
      :proper_types.tuple([
        :proper_types.elements(@option_keys),
        :proper_types.frequency([
          {6, value_gen()},
          {1, pid_gen(Map.keys(@victims) ++ [:dead])},
          {1, config_gen()}
        ])
      ])

    options = :proper_types.resize(3, :proper_types.list(option))

    :proper_types.frequency([
      {6, options},
      # Options that are right but for what was drawn.
      {1, :proper_types.tuple([:proper_types.exactly(:"$connect_opts"), options])},
      {1, :proper_types.tuple([:proper_types.exactly(:"$listener_opts"), options])}
    ])
  end

  # Each value of @values in turn as every argument but the process one,
  # which is a dead pid, then the value too: a deterministic complement to
  # the property's random draws, so that no function and no kind of value
  # is left to chance. Nothing is alive to wait on: every call answers at
  # once.
  test "sweep: every public function, given a dead pid and each value of every type, " <>
         "returns {:error, _} or raises ArgumentError at once",
       ctx do
    calls =
      for mfa <- functions(), value <- @values, as_target <- [false, true], uniq: true do
        {mfa, sweep_args(mfa, value, as_target)}
      end

    for {mfa, args} <- calls do
      outcome = run(mfa, args, %{}, {:must_finish, @must_answer})

      case verdict(mfa, class(mfa, args), outcome) do
        :ok ->
          :ok

        why ->
          flunk("""
          #{inspect(mfa)} given #{inspect(args, limit: 8)}: #{why}
          outcome: #{inspect(outcome, limit: 20)}
          """)
      end
    end

    assert length(calls) > 100 * length(@values)
    assert_nothing_logged(ctx)
  end

  defp sweep_args({_mod, _name, arity} = mfa, value, as_target) do
    target = target(mfa)

    for i <- 0..(arity - 1)//1 do
      case target do
        {^i, _kind} when not as_target -> {:"$pid", :dead}
        _ -> value
      end
    end
  end

  ## Running one call

  defp safe_call?({mfa, args}, bystanders, watch) do
    flush_mailbox()
    Process.put(:counts, Map.update(Process.get(:counts), mfa, 1, &(&1 + 1)))
    groups = refresh(Process.get(:groups))
    Process.put(:groups, groups)
    class = class(mfa, args)
    outcome = run(mfa, args, groups, deadline(class, mfa, args))

    # A call on a process of its kind may change it and what hangs on it
    # (a stream may end, a listener stop): those groups are built anew.
    # Every other process must live on.
    touched =
      if class in [:right, :none] and elem(mfa, 1) not in @read_only,
        do: args |> pid_names() |> Enum.map(&group_of/1) |> Enum.reject(&is_nil/1),
        else: []

    dead =
      for {group, world} <- groups,
          group not in touched,
          {name, pid} <- world,
          Map.has_key?(@victims, name),
          not Process.alive?(pid),
          do: name

    dead = dead ++ for {name, pid} <- bystanders, is_pid(pid), not Process.alive?(pid), do: name
    events = LogWatch.events(watch)

    problem =
      cond do
        (why = verdict(mfa, class, outcome)) != :ok -> why
        dead != [] -> "these processes died: #{inspect(dead)}"
        events != [] -> "logged:\n" <> Enum.map_join(events, "\n", &LogWatch.describe/1)
        true -> nil
      end

    Process.put(:groups, Enum.reduce(Enum.uniq(touched), groups, &rebuild/2))

    if problem do
      LogWatch.clear(watch)

      Process.put(
        :failure,
        "#{inspect(mfa)} (#{class}): #{problem}\noutcome: #{inspect(outcome, limit: 20)}"
      )

      false
    else
      true
    end
  end

  # Runs the call in a process of its own, which resolves the arguments
  # (:self is that process), so that a raise, an exit or a hang is seen.
  defp run({mod, name, _} = mfa, args, groups, {mode, ms}) do
    parent = self()
    tag = make_ref()

    {pid, ref} =
      spawn_monitor(fn ->
        resolved = resolve(args, groups)

        outcome =
          try do
            {:returned, apply(mod, name, resolved)}
          rescue
            error -> {:raised, error, __STACKTRACE__}
          catch
            kind, reason -> {:caught, kind, reason}
          end

        send(parent, {tag, outcome})
      end)

    receive do
      {^tag, outcome} ->
        Process.demonitor(ref, [:flush])
        outcome

      {:DOWN, ^ref, :process, ^pid, reason} ->
        {:died, reason}
    after
      ms ->
        Process.exit(pid, :kill)

        receive do
          {:DOWN, ^ref, :process, ^pid, _} -> :ok
        end

        if mode == :may_wait, do: :still_waiting, else: {:hung, mfa, ms}
    end
  end

  # How the target of a call relates to the function: :right (the kind it
  # takes), :wrong (another Quichex process), :self (the caller), :dead,
  # :foreign (a process that never answers), :not_a_pid, or :none.
  defp class(mfa, args) do
    case target(mfa) do
      nil ->
        :none

      {i, kind} ->
        case Enum.at(args, i) do
          {:"$pid", name} when name in [:dead, :remote] -> :dead
          {:"$pid", name} when name in [:runner, :test] -> :foreign
          {:"$pid", :self} -> :self
          {:"$pid", name} -> if kind_of(name) == kind, do: :right, else: :wrong
          _other -> :not_a_pid
        end
    end
  end

  defp kind_of(name), do: elem(Map.fetch!(@victims, name), 1)

  defp group_of(name) do
    case Map.fetch(@victims, name) do
      {:ok, {group, _kind}} -> group
      :error -> nil
    end
  end

  # A process that must answer at once gets @must_answer ms; a call that
  # may rightly wait gets its timeout plus grace, or is watched
  # @watch_waiting ms when that is longer.
  defp deadline(class, mfa, args) when class in [:right, :foreign] do
    case timeout_of(mfa, args) do
      :infinity ->
        {:may_wait, @watch_waiting}

      ms when ms + 2_500 <= 3_000 ->
        {:must_finish, ms + 2_500}

      _long ->
        {:may_wait, @watch_waiting}
    end
  end

  defp deadline(_class, _mfa, _args), do: {:must_finish, @must_answer}

  # Listener.stop/2 takes its timeout as an argument; every other function
  # in a :timeout option (an integer argument is something else, such as
  # path_stats/3's path id).
  defp timeout_of({Listener, :stop, 2}, [_listener, ms]) when is_integer(ms) and ms in 0..@max,
    do: ms

  defp timeout_of(_mfa, args) do
    Enum.find_value(args, 5_000, fn
      list when is_list(list) -> valid_timeout(list)
      _ -> nil
    end)
  end

  defp valid_timeout(list) do
    if Keyword.keyword?(list) do
      case Keyword.get(list, :timeout) do
        ms when is_integer(ms) and ms in 0..@max -> ms
        :infinity -> :infinity
        _ -> nil
      end
    end
  end

  # :ok, or what is wrong with the outcome of a call.
  defp verdict({mod, name, _} = mfa, class, outcome) do
    case outcome do
      {:raised, %ArgumentError{}, _} ->
        :ok

      # A function clause of the API itself: arguments of the wrong type.
      {:raised, %FunctionClauseError{module: m, function: f, arity: a}, _} when m in @modules ->
        if {f, a} in m.__info__(:functions),
          do: :ok,
          else: "raised FunctionClauseError in the private #{inspect(m)}.#{f}/#{a}"

      :still_waiting ->
        :ok

      {:returned, value} ->
        cond do
          String.ends_with?(Atom.to_string(name), "?") and not is_boolean(value) ->
            "a predicate returned #{inspect(value)}"

          String.ends_with?(Atom.to_string(name), "?") ->
            :ok

          class in [:right, :none] ->
            :ok

          true ->
            returned(mfa, class, value)
        end

      {:raised, error, stack} ->
        message = Exception.format(:error, error, stack)
        "raised #{inspect(error.__struct__)}: " <> String.slice(message, 0, 1_500)

      _caught_died_or_hung ->
        "#{inspect(mod)}.#{name} did not return nor raise"
    end
  end

  defp returned({mod, _, _} = mfa, class, value) do
    expected =
      case class do
        class when class in [:wrong, :self] -> {:error, :"not_a_#{target_kind(mfa)}"}
        :dead -> {:error, :closed}
        _ -> :any_error
      end

    cond do
      # Documented: closing or stopping what is gone is done.
      class == :dead and value == :ok and elem(mfa, 1) in [:close, :stop] and mod != Stream ->
        :ok

      # Documented (@doc false): a listener's children, none for anything else.
      mfa == {Listener, :children, 1} and value == %{} ->
        :ok

      expected == :any_error and match?({:error, _}, value) ->
        :ok

      value == expected ->
        :ok

      true ->
        "given a #{class} pid, returned #{inspect(value, limit: 8)}; expected #{inspect(expected)}"
    end
  end

  defp target_kind(mfa), do: mfa |> target() |> elem(1)

  defp pid_names(term) do
    case term do
      {:"$pid", name} -> [name]
      list when is_list(list) -> Enum.flat_map(list, &pid_names/1)
      tuple when is_tuple(tuple) -> tuple |> Tuple.to_list() |> Enum.flat_map(&pid_names/1)
      _ -> []
    end
  end

  defp resolve(term, groups) do
    case term do
      {:"$pid", :self} ->
        self()

      {:"$pid", :test} ->
        Process.whereis(__MODULE__)

      {:"$pid", :dead} ->
        dead_pid_in_caller()

      {:"$pid", :remote} ->
        remote_pid()

      {:"$pid", name} ->
        Map.fetch!(groups[group_of(name)], name)

      {:"$config", :client} ->
        client_config()

      {:"$config", :server} ->
        server_config()

      {:"$connect_opts", extra} ->
        connect_base(groups) ++ resolve(extra, groups)

      {:"$listener_opts", extra} ->
        listener_base() ++ resolve(extra, groups)

      list when is_list(list) ->
        Enum.map(list, &resolve(&1, groups))

      tuple when is_tuple(tuple) ->
        tuple |> Tuple.to_list() |> Enum.map(&resolve(&1, groups)) |> List.to_tuple()

      other ->
        other
    end
  end

  defp connect_base(groups),
    do: [host: "localhost", port: groups[1].port, config: client_config()]

  defp listener_base,
    do: [
      ip: {127, 0, 0, 1},
      port: 0,
      config: server_config(),
      handler: Echo,
      handler_options: nil
    ]

  defp dead_pid_in_caller do
    pid = spawn(fn -> :ok end)
    ref = Process.monitor(pid)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> pid
    end
  end

  ## The victims

  defp build_group2 do
    {listener, port} = start_listener([connection_handler: Holder] ++ @no_idle)
    Process.unlink(listener)
    conn = connect!(port, @no_idle)
    {:ok, [server_conn]} = Listener.connections(listener)
    assert_receive {:holder, ^server_conn, runner}
    %{listener2: listener, conn2: conn, server_conn2: server_conn, runner: runner}
  end

  # Builds anew a group some process of which is gone.
  defp refresh(groups) do
    Enum.reduce(groups, groups, fn {group, world}, acc ->
      alive? =
        Enum.all?(world, fn {name, pid} ->
          not Map.has_key?(@victims, name) or Process.alive?(pid)
        end)

      if alive?, do: acc, else: rebuild(group, acc)
    end)
  end

  defp rebuild(group, groups) do
    stop_group(groups[group])
    flush_mailbox()
    world = if group == 1, do: build_world(), else: build_group2()
    Map.put(groups, group, world)
  end

  defp stop_group(world) do
    for {name, pid} <- world, name in [:conn, :conn2], do: Connection.close(pid)
    for {name, pid} <- world, name in [:listener, :listener2], do: Listener.stop(pid)
  end

  defp flush_mailbox do
    receive do
      _ -> flush_mailbox()
    after
      0 -> :ok
    end
  end
end
