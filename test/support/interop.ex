defmodule Quichex.Test.Interop do
  @moduledoc false
  # Runs the foreign QUIC peers as Erlang ports, for the interop tests: the
  # aioquic scripts and quinn_peer in integration/peers (same flags and
  # output, see integration/peers/README.md), and ngtcp2's example programs
  # (gtlsserver / gtlsclient). Every wait is bounded and fails with the output
  # so far; a missing peer fails the test (never skips it).

  import ExUnit.Assertions
  import ExUnit.Callbacks, only: [on_exit: 1]

  @peers Path.expand("../../integration/peers", __DIR__)
  @quinn_peer Path.join(@peers, "quinn_peer/target/release/quinn_peer")
  @ngtcp2 %{client: "/usr/bin/gtlsclient", server: "/usr/sbin/gtlsserver"}

  @doc """
  The venv's python: `$QUICHEX_PYTHON`, else `_build/venv/bin/python`.
  Fails (never skips) when neither exists.
  """
  def python! do
    env = System.get_env("QUICHEX_PYTHON")
    fallback = Path.expand("_build/venv/bin/python")
    candidates = Enum.reject([env, fallback], &(&1 in [nil, ""]))

    case Enum.find(candidates, &File.exists?/1) do
      nil ->
        flunk("""
        no python with aioquic for the interop tests: tried #{inspect(candidates)}.
        Run `make deps-python` (or `python3 -m venv _build/venv && \
        _build/venv/bin/pip install -r integration/requirements.txt`).
        """)

      path ->
        path
    end
  end

  @doc """
  The quinn peer binary: `$QUICHEX_QUINN_PEER`, else
  `integration/peers/quinn_peer/target/release/quinn_peer`. Fails (never
  skips) when neither exists.
  """
  def quinn_peer! do
    find_executable!("QUICHEX_QUINN_PEER", @quinn_peer, """
    Run `make deps-peers` (or `cargo build --release --manifest-path \
    integration/peers/quinn_peer/Cargo.toml`).
    """)
  end

  @doc """
  ngtcp2's example client or server (Debian's ngtcp2-client / ngtcp2-server,
  GnuTLS flavour): `$QUICHEX_NGTCP2_CLIENT` / `$QUICHEX_NGTCP2_SERVER`, else
  `/usr/bin/gtlsclient` / `/usr/sbin/gtlsserver`. Fails when missing.
  """
  def ngtcp2!(role) when role in [:client, :server] do
    env = if role == :client, do: "QUICHEX_NGTCP2_CLIENT", else: "QUICHEX_NGTCP2_SERVER"
    find_executable!(env, @ngtcp2[role], "Run `apt-get install ngtcp2-client ngtcp2-server`.")
  end

  defp find_executable!(env_var, fallback, hint) do
    candidates = Enum.reject([System.get_env(env_var), fallback], &(&1 in [nil, ""]))

    case Enum.find(candidates, &File.exists?/1) do
      nil ->
        flunk(
          "no #{Path.basename(fallback)} for the interop tests: tried #{inspect(candidates)}.\n" <>
            hint
        )

      path ->
        path
    end
  end

  @doc """
  The command of a peer in a role: `{executable, leading_args}`. `peer` is
  `:aioquic` or `:quinn`; both take the same flags and print the same lines.
  """
  def peer_command!(:aioquic, :server),
    do: {python!(), [Path.join(@peers, "aioquic_echo_server.py")]}

  def peer_command!(:aioquic, :client),
    do: {python!(), [Path.join(@peers, "aioquic_echo_client.py")]}

  def peer_command!(:quinn, role) when role in [:server, :client],
    do: {quinn_peer!(), [Atom.to_string(role)]}

  @doc """
  Starts aioquic_echo_server.py and waits for `LISTENING <port>`. Returns
  `{peer, udp_port}`. The server exits when its port is closed (stdin EOF);
  an on_exit callback makes sure it is gone.
  """
  def start_server!(python, args, timeout \\ 10_000) do
    start_peer_server!({python, [Path.join(@peers, "aioquic_echo_server.py")]}, args, timeout)
  end

  @doc """
  Starts the echo server of `peer` (`:aioquic`, `:quinn` or a command from
  `peer_command!/2`) on 127.0.0.1 with the test certificate and waits for
  `LISTENING <port>`. Returns `{peer_port, udp_port}`; stdout lines can be
  awaited with `await_line/3`.
  """
  def start_peer_server!(peer, args, timeout \\ 10_000)

  def start_peer_server!(peer, args, timeout) when is_atom(peer),
    do: start_peer_server!(peer_command!(peer, :server), args, timeout)

  def start_peer_server!({exe, leading}, args, timeout) do
    c = Quichex.Test.Helpers.certs()
    args = ["--host", "127.0.0.1", "--port", "0", "--cert", c.cert, "--key", c.key | args]
    peer = open(exe, leading ++ args)
    {:os_pid, os_pid} = Port.info(peer, :os_pid)
    on_exit(fn -> stop(peer, os_pid) end)

    case await_line(peer, ~r/^LISTENING (\d+)$/, timeout) do
      [_, port] -> {peer, String.to_integer(port)}
    end
  end

  @doc """
  Waits for a stdout line of `peer` that matches `regex` and returns the
  captures. Lines that do not match are skipped (and reported on failure).
  """
  def await_line(peer, regex, timeout \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_await_line(peer, regex, deadline, [])
  end

  defp do_await_line(peer, regex, deadline, seen) do
    wait = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^peer, {:data, {:eol, line}}} ->
        case Regex.run(regex, line) do
          nil -> do_await_line(peer, regex, deadline, [line | seen])
          captures -> captures
        end

      {^peer, {:data, {:noeol, part}}} ->
        do_await_line(peer, regex, deadline, [part | seen])

      {^peer, {:exit_status, status}} ->
        flunk(
          "peer exited with status #{status} before a line matching #{inspect(regex)}; " <>
            "output: #{inspect(Enum.reverse(seen))}"
        )
    after
      wait ->
        flunk(
          "no line matching #{inspect(regex)} from the peer within the timeout; " <>
            "output: #{inspect(Enum.reverse(seen))}"
        )
    end
  end

  @doc """
  Runs aioquic_echo_client.py against 127.0.0.1:`port` until it exits and
  returns `{exit_status, result}`, `result` being its JSON line as a map with
  atom keys (`ok`, `alpn`, `bidi`, `uni`, `bytes`, `key_phase`, `error`).
  `--timeout` is set from `timeout` (ms); the wait here is a bit longer.
  """
  def run_client!(python, port, args, timeout \\ 10_000) do
    run_peer_client!({python, [Path.join(@peers, "aioquic_echo_client.py")]}, port, args, timeout)
  end

  @doc """
  Like `run_client!/4`, for the client of `peer` (`:aioquic`, `:quinn` or a
  command from `peer_command!/2`). quinn's JSON has `mbps` and `key_update`
  where aioquic's has `key_phase` (and `mbps` too).
  """
  def run_peer_client!(peer, port, args, timeout \\ 10_000)

  def run_peer_client!(peer, port, args, timeout) when is_atom(peer),
    do: run_peer_client!(peer_command!(peer, :client), port, args, timeout)

  def run_peer_client!({exe, leading}, port, args, timeout) do
    args =
      [
        "--host",
        "127.0.0.1",
        "--port",
        Integer.to_string(port),
        "--cafile",
        Quichex.Test.Helpers.certs().ca,
        "--timeout",
        Float.to_string(timeout / 1000)
      ] ++ args

    {status, lines} = run!(exe, leading ++ args, timeout + 5_000, stderr: false)

    case Enum.filter(lines, &String.starts_with?(&1, "{")) do
      [json] -> {status, parse_result!(json)}
      _ -> flunk("expected one JSON line from the client, got: #{inspect(lines)}")
    end
  end

  @doc """
  Runs `exe` with `args` until it exits and returns `{exit_status, lines}`:
  its stdout, and its stderr too with `stderr: true` (the default). Fails if
  it is still running after `timeout` ms.
  """
  def run!(exe, args, timeout, opts \\ [stderr: true]) do
    # May run in a task (no on_exit there): clean up before returning.
    peer = open(exe, args, opts)
    {:os_pid, os_pid} = Port.info(peer, :os_pid)

    try do
      collect(peer, System.monotonic_time(:millisecond) + timeout, [], [])
    after
      stop(peer, os_pid)
    end
  end

  @doc """
  Starts ngtcp2's gtlsserver on 127.0.0.1 with the test certificate (it
  speaks HTTP/3 only: ALPN h3) and waits until its UDP port is bound.
  Returns `{peer, udp_port}`. Its debug output (no frame payload dumps) can
  be awaited with `await_line/3`; it is killed on exit.
  """
  def start_ngtcp2_server!(args \\ [], timeout \\ 5_000) do
    c = Quichex.Test.Helpers.certs()
    exe = ngtcp2!(:server)
    port = free_udp_port()
    argv = ["--no-quic-dump", "--no-http-dump" | args] ++ ["127.0.0.1", "#{port}", c.key, c.cert]
    peer = open(exe, argv, stderr: true)
    {:os_pid, os_pid} = Port.info(peer, :os_pid)
    on_exit(fn -> stop(peer, os_pid) end)
    await_bound(port, peer, System.monotonic_time(:millisecond) + timeout)
    {peer, port}
  end

  @doc """
  Runs ngtcp2's gtlsclient with `options` against 127.0.0.1:`port`,
  requesting `uris` (HTTP/3), until it exits. Returns `{exit_status, lines}`
  (stdout and stderr, which carries its debug output). Fails if it runs
  longer than `timeout` ms.
  """
  def run_ngtcp2_client!(port, options, uris, timeout \\ 10_000) do
    argv = ["--no-quic-dump", "--no-http-dump" | options] ++ ["127.0.0.1", "#{port}" | uris]
    run!(ngtcp2!(:client), argv, timeout)
  end

  # A UDP port that was free a moment ago (gtlsserver cannot pick one itself).
  defp free_udp_port do
    {:ok, socket} = :gen_udp.open(0, ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(socket)
    :ok = :gen_udp.close(socket)
    port
  end

  # Polls until someone (the server) has bound 127.0.0.1:port.
  defp await_bound(port, peer, deadline) do
    case :gen_udp.open(port, ip: {127, 0, 0, 1}) do
      {:error, :eaddrinuse} ->
        :ok

      {:ok, socket} ->
        :gen_udp.close(socket)

        receive do
          {^peer, {:exit_status, status}} ->
            flunk("the ngtcp2 server exited with status #{status} before binding port #{port}")
        after
          0 -> :ok
        end

        if System.monotonic_time(:millisecond) > deadline,
          do: flunk("the ngtcp2 server did not bind UDP port #{port} in time")

        Process.sleep(20)
        await_bound(port, peer, deadline)
    end
  end

  defp collect(peer, deadline, partial, lines) do
    wait = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^peer, {:data, {:noeol, part}}} ->
        collect(peer, deadline, [partial | part], lines)

      {^peer, {:data, {:eol, part}}} ->
        collect(peer, deadline, [], [IO.iodata_to_binary([partial | part]) | lines])

      {^peer, {:exit_status, status}} ->
        {status, Enum.reverse(lines)}
    after
      wait ->
        flunk(
          "the client did not exit in time; output: #{inspect(Enum.reverse(lines), limit: 200)}"
        )
    end
  end

  # The client's JSON is flat: string, number, boolean and null values.
  @doc false
  def parse_result!(json) do
    pairs =
      Regex.scan(
        ~r/"(\w+)":\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null)/,
        json,
        capture: :all_but_first
      )

    if pairs == [], do: flunk("cannot parse the client's JSON: #{inspect(json)}")

    Map.new(pairs, fn [key, value] -> {String.to_atom(key), json_value(value)} end)
  end

  defp json_value("true"), do: true
  defp json_value("false"), do: false
  defp json_value("null"), do: nil

  defp json_value("\"" <> _ = string) do
    string
    |> String.slice(1..-2//1)
    |> String.replace(~r/\\(["\\\/])/, "\\1")
  end

  defp json_value(number) do
    case Integer.parse(number) do
      {int, ""} ->
        int

      _ ->
        {float, ""} = Float.parse(number)
        float
    end
  end

  defp open(exe, args, opts \\ []) do
    stderr = if opts[:stderr], do: [:stderr_to_stdout], else: []

    Port.open(
      {:spawn_executable, exe},
      [:binary, :exit_status, {:line, 4096}, args: args] ++ stderr
    )
  end

  # Closing the port closes the peer's stdin; our peers exit on EOF. The
  # port may already be closed (its owner has exited, or the peer did).
  # ngtcp2's programs ignore stdin: they get SIGTERM, then SIGKILL.
  defp stop(peer, os_pid) do
    try do
      Port.close(peer)
    rescue
      ArgumentError -> :ok
    end

    unless wait_gone(os_pid, 25) do
      System.cmd("kill", ["-TERM", Integer.to_string(os_pid)], stderr_to_stdout: true)

      unless wait_gone(os_pid, 25) do
        System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true)
      end
    end

    :ok
  end

  defp wait_gone(_os_pid, 0), do: false

  defp wait_gone(os_pid, tries) do
    if File.exists?("/proc/#{os_pid}") and not zombie?(os_pid) do
      Process.sleep(20)
      wait_gone(os_pid, tries - 1)
    else
      true
    end
  end

  defp zombie?(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} -> stat |> String.split(") ") |> List.last() |> String.starts_with?("Z")
      _ -> true
    end
  end
end
