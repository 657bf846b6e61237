defmodule Quichex.Test.Interop do
  @moduledoc false
  # Runs the aioquic peers in integration/peers as Erlang ports, for the
  # interop tests. Every wait is bounded and fails with the output so far.

  import ExUnit.Assertions
  import ExUnit.Callbacks, only: [on_exit: 1]

  @peers Path.expand("../../integration/peers", __DIR__)

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
  Starts aioquic_echo_server.py and waits for `LISTENING <port>`. Returns
  `{peer, udp_port}`. The server exits when its port is closed (stdin EOF);
  an on_exit callback makes sure it is gone.
  """
  def start_server!(python, args, timeout \\ 10_000) do
    c = Quichex.Test.Helpers.certs()
    args = ["--host", "127.0.0.1", "--port", "0", "--cert", c.cert, "--key", c.key | args]
    peer = open(python, "aioquic_echo_server.py", args)
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

    # May run in a task (no on_exit there): clean up before returning.
    peer = open(python, "aioquic_echo_client.py", args)
    {:os_pid, os_pid} = Port.info(peer, :os_pid)

    {status, lines} =
      try do
        collect(peer, System.monotonic_time(:millisecond) + timeout + 5_000, [], [])
      after
        stop(peer, os_pid)
      end

    case Enum.filter(lines, &String.starts_with?(&1, "{")) do
      [json] -> {status, parse_result!(json)}
      _ -> flunk("expected one JSON line from the client, got: #{inspect(lines)}")
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
      wait -> flunk("the aioquic client did not exit in time; output: #{inspect(lines)}")
    end
  end

  # The client's JSON is flat: string, integer, boolean and null values.
  @doc false
  def parse_result!(json) do
    pairs =
      Regex.scan(~r/"(\w+)":\s*("(?:[^"\\]|\\.)*"|-?\d+|true|false|null)/, json,
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

  defp json_value(int), do: String.to_integer(int)

  defp open(python, script, args) do
    peer =
      Port.open({:spawn_executable, python}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: [Path.join(@peers, script) | args]
      ])

    peer
  end

  # Closing the port closes the peer's stdin; the server exits on EOF. The
  # port may already be closed (its owner has exited, or the peer did).
  defp stop(peer, os_pid) do
    try do
      Port.close(peer)
    rescue
      ArgumentError -> :ok
    end

    unless wait_gone(os_pid, 50) do
      System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true)
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
