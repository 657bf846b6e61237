# Benchmarks: Quichex against raw quiche, built and run in the same run.
#
#     make bench                      # every scenario, 3 runs each
#     mix run bench/bench.exs -- --only rtt,bulk --runs 1 --bulk-size 104857600
#     mix run bench/bench.exs -- --idle 100000
#     mix run bench/bench.exs -- --only dgram --runs 1 --dgram-seconds 10
#     mix run bench/bench.exs -- --hops   # process hops, NIF calls per request
#
# Each scenario runs the Rust baseline (bench/quiche_baseline: quiche over
# plain UDP sockets, no BEAM) and then the same scenario through the public
# Quichex API (a Listener with a `use Quichex.Handler` server, a
# Quichex.Connection / Quichex.Stream client), and reports medians and the
# ratio. Results go to bench/results/latest.md and latest.json.
#
# Scenarios (`--only` takes a comma-separated list of names):
#
#   bulk, bulk_gso       one stream of --bulk-size bytes, client -> server
#   bulk_loss1, bulk_loss1_paced
#                        one stream of up to 256 MiB through the baseline's
#                        relay dropping 1% of datagrams each way, bbr2 on
#                        both sides; Quichex with pacing off, then on (raw
#                        quiche sends as soon as quiche produces packets)
#   rtt_p50 (+ rtt_p99)  64 B request/response on one stream, --rtt-rounds
#   rtt_streams          64 B request/response, a new stream per request
#   rtt_close (+ rtt_close_p99)
#                        as rtt_streams, but the server writes the reply and
#                        then the FIN in a separate call (Stream.send, then
#                        Stream.close); the client waits for that FIN.
#                        Target: Quichex p50 within 60 us of raw quiche.
#   handshakes, handshakes_64   sequential / 64 in flight
#   streams, streams_gso 1000 concurrent streams x 1 MB on one connection
#                        (streams_gso: raw quiche with GSO and GRO)
#   idle                 memory per idle connection (--idle connections)
#   dgram (+ dgram_loss) DATAGRAMs (RFC 9221) of --dgram-size bytes (1200)
#                        echoed by the server for --dgram-seconds (5):
#                        echoes received per second, and the percentage
#                        sent but never echoed. The client keeps at most
#                        256 numbered datagrams in flight past the
#                        highest echoed, backs off on a full send queue, and
#                        then collects echoes until 200 ms pass without one.
#                        Target: >= 0.7x raw quiche.
#
# The client streams are passive (`active: false`, read with
# Quichex.Stream.recv/2); the servers are `use Quichex.Handler` modules. The
# dgram client is active: echoes arrive as {:quic_dgram, conn, data}.

defmodule Bench.Sink do
  @moduledoc "Reads and discards a stream; answers \"ok\" with FIN after the peer's FIN."
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_data(_data, _stream, state), do: {:continue, state}

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    _ = Quichex.Stream.send(stream, "ok", fin: true)
    {:close, state}
  end
end

defmodule Bench.Echo do
  @moduledoc "Echoes a stream back; FIN after the peer's FIN."
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_data(data, stream, state) do
    :ok = Quichex.Stream.send(stream, data, timeout: 60_000)
    {:continue, state}
  end

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    _ = Quichex.Stream.close(stream)
    {:close, state}
  end
end

defmodule Bench.ReplyClose do
  @moduledoc """
  Reads a request to its FIN, then writes a 64-byte reply and ends the
  sending side with a separate call: an empty FIN written on its own.
  """
  use Quichex.Handler

  @reply :binary.copy("a", 64)

  @impl Quichex.Handler
  def handle_data(_data, _stream, state), do: {:continue, state}

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    :ok = Quichex.Stream.send(stream, @reply)
    :ok = Quichex.Stream.close(stream)
    {:close, state}
  end
end

defmodule Bench.DgramEcho do
  @moduledoc """
  Sends every DATAGRAM back. An echo the full send queue refuses is dropped
  (as the baseline's dgram_echo server does) and counted in the `:counters`
  given as handler options; so is one that no longer fits the path. Echoes
  after the client closed (`{:error, :closed}`) are not counted.
  """
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_datagram(data, conn, refused) do
    case Quichex.Connection.dgram_send(conn, data) do
      {:error, :queue_full} -> :counters.add(refused, 1, 1)
      {:error, {:too_big, _}} -> :counters.add(refused, 1, 1)
      _ok_or_closed -> :ok
    end

    {:continue, refused}
  end
end

defmodule Bench do
  @alpn "quichex-bench"
  @baseline_dir Path.expand("quiche_baseline", __DIR__)
  @results_dir Path.expand("results", __DIR__)

  # The transport settings both sides use (the baseline hard-codes the same).
  @transport [
    max_idle_timeout: 30_000,
    initial_max_data: 10_000_000,
    initial_max_stream_data_bidi_local: 1_000_000,
    initial_max_stream_data_bidi_remote: 1_000_000,
    initial_max_stream_data_uni: 1_000_000,
    initial_max_streams_bidi: 2_000,
    initial_max_streams_uni: 100,
    max_send_udp_payload_size: 1350
  ]

  # The dgram scenario's settings (the baseline's DGRAM_QUEUE_LEN; the
  # other scenarios run without datagrams, as their baseline does).
  @dgram_config [enable_dgram: true, dgram_recv_queue_len: 1000, dgram_send_queue_len: 1000]
  # Datagram numbers in flight past the highest one echoed.
  @dgram_window 256
  # Window full this long without an echo: what is in flight counts as lost.
  @dgram_stall_ms 50
  # After the sending time, collect echoes until none came for this long...
  @dgram_quiet_ms 200
  # ...or this long has passed.
  @dgram_drain_ms 2_000

  def main(argv) do
    argv = Enum.drop_while(argv, &(&1 == "--"))

    {opts, _, _} =
      OptionParser.parse(argv,
        strict: [
          only: :string,
          runs: :integer,
          bulk_size: :integer,
          idle: :integer,
          cc: :string,
          rtt_rounds: :integer,
          dgram_seconds: :integer,
          dgram_size: :integer,
          hops: :boolean
        ]
      )

    if opts[:hops], do: hops_main(opts[:cc]), else: run_main(opts)
  end

  defp run_main(opts) do
    runs = opts[:runs] || 3
    cc = String.to_atom(opts[:cc] || "cubic")

    settings = %{
      cc: cc,
      bulk_size: opts[:bulk_size] || 1_073_741_824,
      rtt_rounds: opts[:rtt_rounds] || 10_000,
      idle: opts[:idle] || 10_000,
      dgram_seconds: opts[:dgram_seconds] || 5,
      dgram_size: opts[:dgram_size] || 1200
    }

    scenarios = scenarios(settings)

    scenarios =
      case opts[:only] do
        nil -> scenarios
        list -> Enum.filter(scenarios, &(&1.name in String.split(list, ",")))
      end

    dir = Path.join(System.tmp_dir!(), "quichex-bench-#{System.unique_integer([:positive])}")
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))
    baseline = build_baseline!()

    env = %{cert: cert, key: key, baseline: baseline, settings: settings}
    IO.puts("machine: #{machine()}; cc: #{cc}; runs per scenario: #{runs}")

    rows =
      for scenario <- scenarios do
        samples =
          for run <- 1..runs do
            IO.write("  #{scenario.name} run #{run}/#{runs}: baseline... ")
            base = scenario.baseline.(env)
            IO.write("#{fmt(base[scenario.metric])} #{scenario.unit}; quichex... ")
            ours = scenario.quichex.(env)
            IO.puts("#{fmt(ours[scenario.metric])} #{scenario.unit}")
            %{baseline: base, quichex: ours}
          end

        # Extra rows read from the same runs (the rtt p99 next to the p50).
        for row <- [scenario | Map.get(scenario, :also, [])], do: summarize(row, samples)
      end
      |> List.flatten()

    File.rm_rf(dir)
    report(rows, settings, runs)
  end

  ## Process hops and NIF calls per request

  # `--hops`: one connection, 64 B request/response on one stream (the
  # rtt scenario), traced on both sides for @hop_rounds rounds: messages
  # each process receives (socket readiness notices included) and calls
  # into the NIF, per round.
  @hop_rounds 2_000

  defp hops_main(cc) do
    cc = String.to_atom(cc || "cubic")
    dir = Path.join(System.tmp_dir!(), "quichex-hops-#{System.unique_integer([:positive])}")
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))
    env = %{cert: cert, key: key, settings: %{cc: cc}}
    {listener, port} = start_listener(env, Bench.Echo)
    conn = connect!(port, cc)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
    request = :binary.copy("r", 64)

    round = fn ->
      :ok = Quichex.Stream.send(stream, request)
      {:ok, _, false} = Quichex.Stream.recv(stream, length: 64, timeout: 5_000)
    end

    for _ <- 1..100, do: round.()

    {:ok, [server_conn]} = Quichex.Listener.connections(listener)
    %{sockets: sockets} = Quichex.Listener.children(listener)
    {:links, links} = Process.info(server_conn, :links)
    server_streams = Enum.filter(links, &(is_pid(&1) and &1 not in sockets))

    roles =
      [
        {self(), "client: caller"},
        {conn, "client: connection"},
        {stream, "client: stream"},
        {server_conn, "server: connection"}
      ] ++
        Enum.map(server_streams, &{&1, "server: stream / handler"}) ++
        Enum.map(sockets, &{&1, "server: listener socket"})

    tracer = spawn(fn -> hop_tracer(%{}) end)
    :erlang.trace_pattern({Quichex.Native, :_, :_}, true, [:global])
    for {pid, _} <- roles, do: :erlang.trace(pid, true, [:receive, :call, {:tracer, tracer}])
    for _ <- 1..@hop_rounds, do: round.()
    for {pid, _} <- roles, do: :erlang.trace(pid, false, [:receive, :call])
    :erlang.trace_pattern({Quichex.Native, :_, :_}, false, [:global])
    send(tracer, {:done, self()})
    counts = receive do: ({:counts, counts} -> counts)

    IO.puts("per 64 B request/response (#{@hop_rounds} rounds, one stream, #{cc}):")
    IO.puts("| process | messages received | NIF calls |\n|---|---|---|")

    for {pid, role} <- roles do
      msgs = Map.get(counts, {pid, :receive}, 0) / @hop_rounds
      nifs = counts |> Enum.filter(&match?({{^pid, {:call, _}}, _}, &1)) |> Enum.map(&elem(&1, 1))

      detail =
        counts
        |> Enum.filter(&match?({{^pid, {:call, _}}, _}, &1))
        |> Enum.map_join(", ", fn {{_, {:call, f}}, n} ->
          "#{f} #{Float.round(n / @hop_rounds, 2)}"
        end)

      IO.puts(
        "| #{role} | #{Float.round(msgs, 2)} | #{Float.round(Enum.sum(nifs) / @hop_rounds, 2)} (#{detail}) |"
      )
    end

    :ok = Quichex.Connection.close(conn)
    Quichex.Listener.stop(listener)
    File.rm_rf(dir)
  end

  defp hop_tracer(counts) do
    receive do
      {:trace, pid, :receive, _msg} ->
        hop_tracer(Map.update(counts, {pid, :receive}, 1, &(&1 + 1)))

      {:trace, pid, :call, {_m, f, _a}} ->
        hop_tracer(Map.update(counts, {pid, {:call, f}}, 1, &(&1 + 1)))

      {:done, from} ->
        send(from, {:counts, counts})
    end
  end

  ## Scenarios

  defp scenarios(s) do
    [
      %{
        name: "bulk",
        desc: "one stream, #{div(s.bulk_size, 1_048_576)} MiB client -> server",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline: &baseline(&1, "sink", ["--scenario", "bulk", "--size", "#{s.bulk_size}"]),
        quichex: &with_listener(&1, Bench.Sink, fn port -> bulk(port, s.bulk_size, s.cc) end)
      },
      %{
        name: "bulk_gso",
        desc: "as bulk, against raw quiche with UDP GSO (client) and GRO (server)",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline:
          &baseline(&1, "sink", ["--scenario", "bulk", "--size", "#{s.bulk_size}", "--gso"], [
            "--gro"
          ]),
        quichex: &with_listener(&1, Bench.Sink, fn port -> bulk(port, s.bulk_size, s.cc) end)
      },
      %{
        name: "bulk_loss1",
        desc:
          "one stream, #{div(loss_size(s), 1_048_576)} MiB client -> server through a relay dropping 1% each way, bbr2, Quichex pacing off",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline: &baseline_lossy(&1, ["--scenario", "bulk", "--size", "#{loss_size(s)}"]),
        quichex: &bulk_lossy(&1, loss_size(s), false)
      },
      %{
        name: "bulk_loss1_paced",
        desc: "as bulk_loss1, Quichex pacing on (quiche's SendInfo.at, batches of send_quantum)",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline: &baseline_lossy(&1, ["--scenario", "bulk", "--size", "#{loss_size(s)}"]),
        quichex: &bulk_lossy(&1, loss_size(s), true)
      },
      %{
        name: "rtt_p50",
        desc: "64 B request/response on one stream, #{s.rtt_rounds} rounds, p50",
        metric: :p50_us,
        unit: "us",
        better: :lower,
        baseline: &baseline(&1, "echo", ["--scenario", "rtt", "--rounds", "#{s.rtt_rounds}"]),
        quichex: &with_listener(&1, Bench.Echo, fn port -> rtt(port, s.rtt_rounds, s.cc) end),
        also: [
          %{
            name: "rtt_p99",
            desc: "64 B request/response on one stream, p99",
            metric: :p99_us,
            unit: "us",
            better: :lower
          }
        ]
      },
      %{
        name: "rtt_streams",
        desc: "64 B request/response, a new stream per request, p50",
        metric: :p50_us,
        unit: "us",
        better: :lower,
        baseline: &baseline(&1, "echo", ["--scenario", "rtt_streams", "--rounds", "2000"]),
        quichex: &with_listener(&1, Bench.Echo, fn port -> rtt_streams(port, 2_000, s.cc) end)
      },
      %{
        name: "rtt_close",
        desc:
          "64 B request/response, a new stream per request, reply FIN in a separate call, p50 (target: within 60 us of raw)",
        metric: :p50_us,
        unit: "us",
        better: :lower,
        baseline: &baseline(&1, "reply_close", ["--scenario", "rtt_close", "--rounds", "2000"]),
        quichex:
          &with_listener(&1, Bench.ReplyClose, fn port -> rtt_streams(port, 2_000, s.cc) end),
        also: [
          %{
            name: "rtt_close_p99",
            desc:
              "64 B request/response, a new stream per request, reply FIN in a separate call, p99",
            metric: :p99_us,
            unit: "us",
            better: :lower
          }
        ]
      },
      %{
        name: "handshakes",
        desc: "sequential handshakes per second (1000)",
        metric: :per_s,
        unit: "/s",
        better: :higher,
        baseline: &baseline(&1, "echo", ["--scenario", "handshakes", "--rounds", "1000"]),
        quichex: &with_listener(&1, Bench.Echo, fn port -> handshakes(port, 1_000, 1, s.cc) end)
      },
      %{
        name: "handshakes_64",
        desc: "handshakes per second, 64 in flight (2000)",
        metric: :per_s,
        unit: "/s",
        better: :higher,
        baseline:
          &baseline(&1, "echo", [
            "--scenario",
            "handshakes",
            "--rounds",
            "2000",
            "--concurrency",
            "64"
          ]),
        quichex: &with_listener(&1, Bench.Echo, fn port -> handshakes(port, 2_000, 64, s.cc) end)
      },
      %{
        name: "streams",
        desc: "1000 concurrent streams x 1 MB on one connection",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline:
          &baseline(&1, "sink", [
            "--scenario",
            "streams",
            "--streams",
            "1000",
            "--size",
            "1048576"
          ]),
        quichex:
          &with_listener(&1, Bench.Sink, fn port -> streams(port, 1_000, 1_048_576, s.cc) end)
      },
      %{
        name: "streams_gso",
        desc: "as streams, against raw quiche with UDP GSO (client) and GRO (server)",
        metric: :mb_per_s,
        unit: "MB/s",
        better: :higher,
        baseline:
          &baseline(
            &1,
            "sink",
            ["--scenario", "streams", "--streams", "1000", "--size", "1048576", "--gso"],
            ["--gro"]
          ),
        quichex:
          &with_listener(&1, Bench.Sink, fn port -> streams(port, 1_000, 1_048_576, s.cc) end)
      },
      %{
        name: "idle",
        desc: "#{s.idle} idle connections to one server, memory per connection",
        metric: :kb_per_conn,
        unit: "KB",
        better: :lower,
        baseline: &idle_baseline(&1, s.idle),
        quichex: &idle_quichex(&1, s.idle)
      },
      %{
        name: "dgram",
        desc:
          "#{s.dgram_size} B datagrams echoed for #{s.dgram_seconds} s, echoes received per second (target: >= 0.7x raw)",
        metric: :per_s,
        unit: "/s",
        better: :higher,
        baseline:
          &baseline(&1, "dgram_echo", [
            "--scenario",
            "dgram",
            "--seconds",
            "#{s.dgram_seconds}",
            "--size",
            "#{s.dgram_size}",
            "--window",
            "#{@dgram_window}"
          ]),
        quichex: &dgram_quichex(&1, s.dgram_seconds, s.dgram_size),
        also: [
          %{
            name: "dgram_loss",
            desc: "#{s.dgram_size} B datagrams echoed, sent but never echoed",
            metric: :loss_pct,
            unit: "%",
            better: :lower
          }
        ]
      }
    ]
  end

  ## Quichex side

  defp server_config(env, cc, extra) do
    Quichex.Config.new(
      [
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: env.cert,
        load_priv_key_from_pem_file: env.key,
        cc_algorithm: cc
      ] ++ Keyword.merge(@transport, extra)
    )
  end

  defp client_config(cc, extra \\ []) do
    Quichex.Config.new(
      [application_protos: [@alpn], verify_peer: false, cc_algorithm: cc] ++ @transport ++ extra
    )
  end

  defp with_listener(env, handler, fun) do
    {listener, port} = start_listener(env, handler)

    try do
      fun.(port)
    after
      Quichex.Listener.stop(listener)
    end
  end

  defp start_listener(env, handler, config_extra \\ [], listener_extra \\ []) do
    {:ok, listener} =
      Quichex.Listener.start_link(
        [
          ip: {127, 0, 0, 1},
          port: 0,
          config: server_config(env, env.settings.cc, config_extra),
          handler: handler,
          max_connections: 200_000
        ] ++ listener_extra
      )

    {:ok, {_, port}} = Quichex.Listener.sockname(listener)
    {listener, port}
  end

  defp connect!(port, cc) do
    {:ok, conn} =
      Quichex.Connection.connect(
        host: "127.0.0.1",
        port: port,
        config: client_config(cc),
        active: false
      )

    :ok = Quichex.Connection.wait_connected(conn, timeout: 10_000)
    conn
  end

  defp bulk(port, size, cc) do
    conn = connect!(port, cc)
    chunk = :binary.copy(<<0xAB>>, 1_048_576)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
    started = System.monotonic_time(:microsecond)
    send_bytes(stream, chunk, size)
    {:ok, "ok", true} = recv_all(stream)
    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000
    :ok = Quichex.Connection.close(conn)
    %{bytes: size, seconds: seconds, mb_per_s: size / seconds / 1_000_000}
  end

  # The loss scenarios: bbr2 on both sides (quiche 0.30 paces only with
  # it), through the baseline's lossy relay (the same for both sides).
  @loss_permille 10

  defp loss_size(s), do: min(s.bulk_size, 268_435_456)

  defp lossy_env(env), do: put_in(env.settings.cc, :bbr2)

  defp baseline_lossy(env, client_args) do
    env = lossy_env(env)
    server = start_baseline_server(env, "sink", [])
    proxy = start_proxy(env, server.port)

    try do
      {out, status} =
        System.cmd(
          env.baseline,
          ["client", "--port", "#{proxy.port}", "--cc", "bbr2" | client_args],
          stderr_to_stdout: true
        )

      if status != 0, do: raise("baseline client failed: #{out}")
      out |> String.split("\n", trim: true) |> List.last() |> parse_json()
    after
      stop_port(proxy.port_ref)
      stop_port(server.port_ref)
    end
  end

  defp bulk_lossy(env, size, pacing) do
    env = lossy_env(env)
    {listener, port} = start_listener(env, Bench.Sink, enable_pacing: pacing)
    proxy = start_proxy(env, port)

    try do
      {:ok, conn} =
        Quichex.Connection.connect(
          host: "127.0.0.1",
          port: proxy.port,
          config: client_config(:bbr2, enable_pacing: pacing),
          active: false
        )

      :ok = Quichex.Connection.wait_connected(conn, timeout: 10_000)
      chunk = :binary.copy(<<0xAB>>, 1_048_576)
      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
      started = System.monotonic_time(:microsecond)
      send_bytes(stream, chunk, size)
      {:ok, "ok", true} = recv_all(stream)
      seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000
      {:ok, stats} = Quichex.Connection.stats(conn)
      :ok = Quichex.Connection.close(conn)

      %{
        bytes: size,
        seconds: seconds,
        mb_per_s: size / seconds / 1_000_000,
        packets_lost: stats[:packets_lost]
      }
    after
      stop_port(proxy.port_ref)
      Quichex.Listener.stop(listener)
    end
  end

  defp start_proxy(env, upstream) do
    port_ref =
      Port.open({:spawn_executable, env.baseline}, [
        :binary,
        :exit_status,
        {:line, 65_536},
        args: ["proxy", "--upstream", "#{upstream}", "--loss-permille", "#{@loss_permille}"]
      ])

    "LISTENING " <> port = wait_line(port_ref, "LISTENING", 10_000)
    %{port_ref: port_ref, port: String.to_integer(port)}
  end

  defp send_bytes(stream, chunk, left) when left <= byte_size(chunk) do
    :ok = Quichex.Stream.send(stream, binary_part(chunk, 0, left), fin: true, timeout: 60_000)
  end

  defp send_bytes(stream, chunk, left) do
    :ok = Quichex.Stream.send(stream, chunk, timeout: 60_000)
    send_bytes(stream, chunk, left - byte_size(chunk))
  end

  defp recv_all(stream, acc \\ []) do
    case Quichex.Stream.recv(stream, timeout: 60_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data]), true}
      {:ok, data, false} -> recv_all(stream, [acc | data])
      error -> error
    end
  end

  defp rtt(port, rounds, cc) do
    conn = connect!(port, cc)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
    request = :binary.copy("r", 64)

    times =
      for _ <- 1..rounds do
        t0 = System.monotonic_time(:nanosecond)
        :ok = Quichex.Stream.send(stream, request)
        {:ok, _, false} = Quichex.Stream.recv(stream, length: 64, timeout: 5_000)
        System.monotonic_time(:nanosecond) - t0
      end

    :ok = Quichex.Connection.close(conn)
    percentiles(times, rounds)
  end

  # A new stream per request, the request with FIN; each round ends with the
  # reply's FIN (the server decides whether it comes with the data or alone).
  defp rtt_streams(port, rounds, cc) do
    conn = connect!(port, cc)
    request = :binary.copy("r", 64)

    times =
      for _ <- 1..rounds do
        t0 = System.monotonic_time(:nanosecond)

        {:ok, stream} =
          Quichex.Connection.open_stream(conn, :bidirectional, active: false, timeout: 5_000)

        :ok = Quichex.Stream.send(stream, request, fin: true)
        {:ok, <<_::binary-size(64)>>, true} = recv_all(stream)
        System.monotonic_time(:nanosecond) - t0
      end

    :ok = Quichex.Connection.close(conn)
    percentiles(times, rounds)
  end

  defp percentiles(times_ns, rounds) do
    sorted = Enum.sort(times_ns)
    at = fn q -> Enum.at(sorted, min(round(q * rounds), rounds - 1)) / 1_000 end

    %{
      rounds: rounds,
      p50_us: at.(0.5),
      p99_us: at.(0.99),
      mean_us: Enum.sum(sorted) / rounds / 1_000
    }
  end

  defp handshakes(port, count, concurrency, cc) do
    config = client_config(cc)
    started = System.monotonic_time(:microsecond)

    1..count
    |> Task.async_stream(
      fn _ ->
        {:ok, conn} =
          Quichex.Connection.connect(host: "127.0.0.1", port: port, config: config, active: false)

        :ok = Quichex.Connection.wait_connected(conn, timeout: 10_000)
        :ok = Quichex.Connection.close(conn)
      end,
      max_concurrency: concurrency,
      timeout: 30_000
    )
    |> Stream.run()

    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000
    %{count: count, seconds: seconds, per_s: count / seconds}
  end

  defp streams(port, count, size, cc) do
    conn = connect!(port, cc)
    payload = :binary.copy(<<0xCD>>, size)
    started = System.monotonic_time(:microsecond)

    1..count
    |> Task.async_stream(
      fn _ ->
        {:ok, stream} =
          Quichex.Connection.open_stream(conn, :bidirectional, active: false, timeout: 30_000)

        :ok = Quichex.Stream.send(stream, payload, fin: true, timeout: 120_000)
        {:ok, "ok", true} = recv_all(stream)
      end,
      max_concurrency: count,
      timeout: 180_000
    )
    |> Stream.run()

    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000
    :ok = Quichex.Connection.close(conn)
    %{bytes: count * size, seconds: seconds, mb_per_s: count * size / seconds / 1_000_000}
  end

  # The client runs in a process of its own: it is the connection's owner,
  # and echoes still arriving when it closes die with its mailbox.
  defp dgram_quichex(env, seconds, size) do
    refused = :counters.new(1, [:write_concurrency])

    {listener, port} =
      start_listener(env, Bench.DgramEcho, @dgram_config, handler_options: refused)

    try do
      task = Task.async(fn -> dgram_client(port, seconds, size, env.settings.cc) end)
      result = Task.await(task, (seconds + 60) * 1_000)
      Map.put(result, :server_echoes_refused, :counters.get(refused, 1))
    after
      Quichex.Listener.stop(listener)
    end
  end

  # Mirrors the baseline's dgram client: numbered datagrams, at most
  # @dgram_window numbers in flight past the highest echoed.
  defp dgram_client(port, seconds, size, cc) do
    {:ok, conn} =
      Quichex.Connection.connect(
        host: "127.0.0.1",
        port: port,
        config: client_config(cc, @dgram_config)
      )

    :ok = Quichex.Connection.wait_connected(conn, timeout: 10_000)
    {:ok, max} = Quichex.Connection.dgram_max_size(conn)
    if max < size, do: raise("datagrams of #{size} B do not fit (max #{max})")
    start = System.monotonic_time(:microsecond)

    s = %{
      conn: conn,
      pad: :binary.copy(<<0xA5>>, size - 8),
      next: 0,
      acked: 0,
      highest: 0,
      sent: 0,
      echoed: 0,
      reordered: 0,
      queue_full: 0,
      send_end: start + seconds * 1_000_000,
      last_echo: start,
      last_progress: start
    }

    s = s |> dgram_send_loop() |> dgram_drain()
    {:ok, stats} = Quichex.Connection.stats(conn)
    :ok = Quichex.Connection.close(conn)
    secs = max(s.last_echo - start, 1) / 1_000_000

    %{
      sent: s.sent,
      echoed: s.echoed,
      seconds: secs,
      per_s: s.echoed / secs,
      loss_pct: if(s.sent == 0, do: 0.0, else: (s.sent - s.echoed) * 100 / s.sent),
      reordered: s.reordered,
      queue_full: s.queue_full,
      dgrams_sent: stats.dgrams_sent,
      dgrams_received: stats.dgrams_received,
      dgrams_dropped_on_send: stats.dgrams_dropped_on_send,
      dgrams_dropped_on_receive: stats.dgrams_dropped_on_receive,
      packets_sent: stats.packets_sent,
      packets_lost: stats.packets_lost
    }
  end

  defp dgram_send_loop(s) do
    s = take_echoes(s)
    now = System.monotonic_time(:microsecond)

    cond do
      now >= s.send_end ->
        s

      s.next - s.acked < @dgram_window ->
        case Quichex.Connection.dgram_send(s.conn, [<<s.next::64>>, s.pad]) do
          :ok ->
            dgram_send_loop(%{s | next: s.next + 1, sent: s.sent + 1})

          # Back off until an echo (the network moved) or a millisecond.
          {:error, :queue_full} ->
            dgram_send_loop(await_echo(%{s | queue_full: s.queue_full + 1}, 1))

          {:error, reason} ->
            raise "dgram_send: #{inspect(reason)}"
        end

      now - s.last_progress >= @dgram_stall_ms * 1_000 ->
        dgram_send_loop(%{s | acked: s.next, last_progress: now})

      true ->
        dgram_send_loop(await_echo(s, min(@dgram_stall_ms, div(s.send_end - now, 1_000) + 1)))
    end
  end

  defp dgram_drain(s) do
    now = System.monotonic_time(:microsecond)

    if s.echoed >= s.sent or now - s.send_end >= @dgram_drain_ms * 1_000 do
      s
    else
      conn = s.conn

      receive do
        {:quic_dgram, ^conn, <<seq::64, _::binary>>} -> s |> echoed(seq) |> dgram_drain()
      after
        @dgram_quiet_ms -> s
      end
    end
  end

  defp take_echoes(%{conn: conn} = s) do
    receive do
      {:quic_dgram, ^conn, <<seq::64, _::binary>>} -> s |> echoed(seq) |> take_echoes()
    after
      0 -> s
    end
  end

  defp await_echo(%{conn: conn} = s, ms) do
    receive do
      {:quic_dgram, ^conn, <<seq::64, _::binary>>} -> echoed(s, seq)
    after
      ms -> s
    end
  end

  defp echoed(s, seq) do
    now = System.monotonic_time(:microsecond)

    %{
      s
      | echoed: s.echoed + 1,
        reordered: if(seq < s.highest, do: s.reordered + 1, else: s.reordered),
        highest: max(s.highest, seq + 1),
        acked: max(s.acked, seq + 1),
        last_echo: now,
        last_progress: now
    }
  end

  # Idle connections come from the baseline client (a separate OS process),
  # so the numbers are the server's alone: BEAM memory (processes, binaries,
  # ETS) and everything else in the VM's RSS, which is quiche's.
  # Idle connections with a long idle timeout: the clients' keep-alive pings
  # (every 240 s, a tenth of them every 24 s) are then a safety net, not
  # 10,000 packets a second at 100,000 connections.
  @idle_timeout_ms 600_000

  defp idle_quichex(env, n) do
    # 100,000 handshakes on two shared cores: some wait long for their turn.
    {listener, port} =
      start_listener(env, Bench.Echo, [max_idle_timeout: @idle_timeout_ms],
        handshake_timeout: 60_000
      )

    try do
      :erlang.garbage_collect()
      beam0 = :erlang.memory()
      rss0 = rss_kb(System.pid())
      clients = start_idle_clients(env, port, n)
      # Idle connections hibernate after a couple of seconds (their heaps
      # shrink to their live data): measure them at rest.
      Process.sleep(Quichex.Connection.Statem.hibernate_after() + 2_000)
      Enum.each(Process.list(), &:erlang.garbage_collect/1)
      beam1 = :erlang.memory()
      rss1 = rss_kb(System.pid())
      {:ok, stats} = Quichex.Listener.stats(listener)
      stop_idle_clients(clients)

      beam_kb = (beam1[:total] - beam0[:total]) / 1024 / n
      rss_kb_per = (rss1 - rss0) / n
      per = fn key -> Float.round((beam1[key] - beam0[key]) / 1024 / n, 2) end

      IO.write(
        "[#{stats.connections} connections: #{Float.round(rss_kb_per, 2)} KB RSS each = " <>
          "BEAM #{Float.round(beam_kb, 2)} (processes #{per.(:processes)}, binary incl. the " <>
          "quiche::Connection resource #{per.(:binary)}, ets #{per.(:ets)}) + " <>
          "quiche heap and allocators #{Float.round(rss_kb_per - beam_kb, 2)}] "
      )

      %{
        connections: stats.connections,
        kb_per_conn: rss_kb_per,
        beam_kb_per_conn: beam_kb,
        processes_kb_per_conn: (beam1[:processes] - beam0[:processes]) / 1024 / n,
        binary_kb_per_conn: (beam1[:binary] - beam0[:binary]) / 1024 / n,
        ets_kb_per_conn: (beam1[:ets] - beam0[:ets]) / 1024 / n,
        nif_kb_per_conn: rss_kb_per - beam_kb
      }
    after
      Quichex.Listener.stop(listener)
    end
  end

  # Raw quiche's per-connection memory is linear in the count; its
  # single-threaded server does not keep up with 100,000 connections'
  # timers on two shared cores (their idle timeouts fire), so its figure
  # comes from at most @idle_baseline_max connections.
  @idle_baseline_max 20_000

  defp idle_baseline(env, n) when n > @idle_baseline_max do
    Map.put(idle_baseline(env, @idle_baseline_max), :of, n)
  end

  defp idle_baseline(env, n) do
    server =
      start_baseline_server(env, "echo", [
        "--max-conns",
        "#{n + 100}",
        "--idle-timeout-ms",
        "#{@idle_timeout_ms}"
      ])

    rss0 = rss_kb(server.os_pid)
    clients = start_idle_clients(env, server.port, n)
    rss1 = rss_kb(server.os_pid)
    stop_idle_clients(clients)
    stop_port(server.port_ref)
    %{connections: n, kb_per_conn: (rss1 - rss0) / n}
  end

  # One client process per 10,000 connections: each connection has its own
  # UDP socket on the client side, and a process may hold 20,000 files
  # here. They connect one after the other (the server sees at most 64
  # handshakes at a time).
  @idle_per_client 10_000

  defp start_idle_clients(env, port, n) do
    for {share, i} <- Enum.with_index(shares(n, @idle_per_client)) do
      # Each client binds its own loopback address (127.0.0.2, ...): one
      # address has only ~28,000 ephemeral ports.
      client = start_idle_client(env, port, share, {127, 0, 0, i + 2})
      wait_line(client, "IDLE_READY", 600_000)
      client
    end
  end

  defp shares(n, per) when n <= per, do: [n]
  defp shares(n, per), do: [per | shares(n - per, per)]

  defp stop_idle_clients(clients) do
    Enum.each(clients, &Port.command(&1, "done\n"))
    Enum.each(clients, &wait_exit(&1, 120_000))
  end

  defp start_idle_client(env, port, n, {a, b, c, d}) do
    Port.open({:spawn_executable, env.baseline}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      {:line, 65_536},
      args: [
        "client",
        "--port",
        "#{port}",
        "--scenario",
        "idle",
        "--concurrency",
        "#{n}",
        "--cc",
        "#{env.settings.cc}",
        # The first client holds its connections while the others open
        # theirs: minutes, at 100,000.
        "--timeout",
        "3600",
        "--bind-ip",
        "#{a}.#{b}.#{c}.#{d}",
        "--idle-timeout-ms",
        "#{@idle_timeout_ms}"
      ]
    ])
  end

  ## Baseline side

  defp build_baseline! do
    IO.puts("building bench/quiche_baseline (cargo build --release)...")

    {out, status} =
      System.cmd("cargo", ["build", "--release", "--locked", "--quiet"],
        cd: @baseline_dir,
        stderr_to_stdout: true
      )

    if status != 0, do: raise("cargo build of the baseline failed:\n#{out}")
    Path.join([@baseline_dir, "target", "release", "quiche_baseline"])
  end

  defp start_baseline_server(env, mode, extra) do
    args =
      ["server", "--port", "0", "--cert", env.cert, "--key", env.key, "--mode", mode] ++
        ["--cc", "#{env.settings.cc}" | extra]

    port_ref =
      Port.open({:spawn_executable, env.baseline}, [
        :binary,
        :exit_status,
        {:line, 65_536},
        args: args
      ])

    {:os_pid, os_pid} = Port.info(port_ref, :os_pid)
    "LISTENING " <> port = wait_line(port_ref, "LISTENING", 10_000)
    %{port_ref: port_ref, port: String.to_integer(port), os_pid: os_pid}
  end

  defp baseline(env, mode, client_args, server_args \\ []) do
    server = start_baseline_server(env, mode, server_args)

    {out, status} =
      System.cmd(
        env.baseline,
        ["client", "--port", "#{server.port}", "--cc", "#{env.settings.cc}" | client_args],
        stderr_to_stdout: true
      )

    stop_port(server.port_ref)
    if status != 0, do: raise("baseline client failed: #{out}")
    out |> String.split("\n", trim: true) |> List.last() |> parse_json()
  end

  defp wait_line(port, prefix, timeout, seen \\ []) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        if String.starts_with?(line, prefix),
          do: line,
          else: wait_line(port, prefix, timeout, Enum.take([line | seen], 5))

      {^port, {:exit_status, status}} ->
        raise "baseline exited with #{status} before #{prefix}: #{inspect(Enum.reverse(seen))}"
    after
      timeout -> raise "no #{prefix} from the baseline within #{timeout} ms"
    end
  end

  defp wait_exit(port, timeout) do
    receive do
      {^port, {:exit_status, _}} -> :ok
      {^port, {:data, _}} -> wait_exit(port, timeout)
    after
      timeout -> stop_port(port)
    end
  end

  defp stop_port(port) do
    Port.close(port)
  catch
    _, _ -> :ok
  end

  # The baseline prints flat JSON objects of numbers and strings.
  defp parse_json(line) do
    ~r/"([a-z0-9_]+)"\s*:\s*("([^"]*)"|[-0-9.eE+]+|true|false|null)/
    |> Regex.scan(line)
    |> Map.new(fn
      [_, key, _, string] when string != "" -> {String.to_atom(key), string}
      [_, key, value | _] -> {String.to_atom(key), number(value)}
    end)
  end

  defp number(v) do
    case Float.parse(v) do
      {f, ""} -> f
      _ -> v
    end
  end

  ## Report

  defp summarize(scenario, samples) do
    base = Enum.map(samples, &to_num(&1.baseline[scenario.metric]))
    ours = Enum.map(samples, &to_num(&1.quichex[scenario.metric]))
    mb = median(base)
    mo = median(ours)
    ratio = if scenario.better == :higher, do: ratio(mo, mb), else: ratio(mb, mo)

    %{
      name: scenario.name,
      desc: scenario.desc,
      unit: scenario.unit,
      better: scenario.better,
      baseline: mb,
      quichex: mo,
      ratio: ratio,
      quichex_min: Enum.min(ours),
      quichex_max: Enum.max(ours),
      baseline_min: Enum.min(base),
      baseline_max: Enum.max(base),
      details: samples |> List.last() |> Map.get(:quichex)
    }
  end

  # Nothing over nothing (no loss on either side) is even; something over
  # nothing has no ratio.
  defp ratio(a, b) when b == 0, do: if(a == 0, do: 1.0, else: nil)
  defp ratio(a, b), do: a / b

  defp to_num(n) when is_number(n), do: n
  defp to_num(_), do: 0.0

  defp median(list) do
    sorted = Enum.sort(list)
    n = length(sorted)

    if rem(n, 2) == 1,
      do: Enum.at(sorted, div(n, 2)),
      else: (Enum.at(sorted, div(n, 2) - 1) + Enum.at(sorted, div(n, 2))) / 2
  end

  defp report(rows, settings, runs) do
    header =
      "| scenario | raw quiche (median) | Quichex (median) | ratio (Quichex/raw, >1 better) | Quichex min..max | raw min..max |"

    sep = "|---|---|---|---|---|---|"

    lines =
      for r <- rows do
        "| #{r.name}: #{r.desc} | #{fmt(r.baseline)} #{r.unit} | #{fmt(r.quichex)} #{r.unit} | #{fmt(r.ratio)} | " <>
          "#{fmt(r.quichex_min)}..#{fmt(r.quichex_max)} | #{fmt(r.baseline_min)}..#{fmt(r.baseline_max)} |"
      end

    table = Enum.join([header, sep | lines], "\n")
    IO.puts("\n" <> table)

    File.mkdir_p!(@results_dir)

    md = """
    # Benchmark results

    Generated by `make bench` on #{DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601()}.
    Machine: #{machine()}. Congestion control: #{settings.cc}. #{runs} runs per scenario, medians.
    Ratios are Quichex relative to raw quiche built and run in the same run; for
    latency and memory the ratio is raw/Quichex, so above 1 is always better.

    #{table}

    Idle connection breakdown (Quichex, last run): #{inspect(details(rows, "idle"))}
    """

    md = md <> dgram_details(rows)

    File.write!(Path.join(@results_dir, "latest.md"), md)
    File.write!(Path.join(@results_dir, "latest.json"), json(rows))
    IO.puts("\nwrote bench/results/latest.md and latest.json")
  end

  defp details(rows, name), do: Enum.find_value(rows, fn r -> r.name == name && r.details end)

  defp dgram_details(rows) do
    case details(rows, "dgram") do
      nil -> ""
      d -> "\nDatagram counters (Quichex, last run): #{inspect(d)}\n"
    end
  end

  defp json(rows) do
    items =
      Enum.map(rows, fn r ->
        fields =
          [
            name: r.name,
            unit: r.unit,
            baseline: r.baseline,
            quichex: r.quichex,
            ratio: r.ratio,
            quichex_min: r.quichex_min,
            quichex_max: r.quichex_max
          ]
          |> Enum.map_join(", ", fn {k, v} -> "\"#{k}\": #{encode(v)}" end)

        "  {" <> fields <> "}"
      end)

    "[\n" <> Enum.join(items, ",\n") <> "\n]\n"
  end

  defp encode(nil), do: "null"
  defp encode(v) when is_binary(v), do: inspect(v)
  defp encode(v) when is_float(v), do: Float.round(v, 3) |> to_string()
  defp encode(v), do: to_string(v)

  defp fmt(v) when is_float(v),
    do: :erlang.float_to_binary(v, decimals: if(abs(v) >= 100, do: 0, else: 2))

  defp fmt(v) when is_integer(v), do: Integer.to_string(v)
  defp fmt(nil), do: "n/a"
  defp fmt(v), do: inspect(v)

  defp machine do
    cores = System.schedulers_online()
    {mem, _} = System.cmd("sh", ["-c", "grep MemTotal /proc/meminfo | awk '{print $2}'"])
    gib = String.trim(mem) |> String.to_integer() |> div(1024 * 1024)
    "#{cores} cores, #{gib} GiB, OTP #{System.otp_release()}, Elixir #{System.version()}"
  end

  defp rss_kb(os_pid) do
    case File.read("/proc/#{os_pid}/status") do
      {:ok, status} ->
        [_, kb] = Regex.run(~r/VmRSS:\s+(\d+) kB/, status)
        String.to_integer(kb)

      _ ->
        0
    end
  end
end

Bench.main(System.argv())
