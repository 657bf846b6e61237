defmodule Quichex.ExamplesTest do
  # Every script in examples/ runs here in its short mode
  # (QUICHEX_EXAMPLE_SHORT=1), as `mix run` in its own VM against this
  # build, so none of them rots. Each must exit 0 and print what it
  # promises; every example picks its ports with port 0, so they can run
  # beside other tests.
  use ExUnit.Case, async: true

  @moduletag timeout: 180_000

  @root Path.expand("../..", __DIR__)
  # Bounds a failure only: a short example takes a few seconds.
  @deadline_ms 60_000

  test "examples/echo.exs echoes every stream byte-exact" do
    {status, out} = run_example!("echo.exs")
    assert status == 0, out
    assert out =~ ~r/PASS: [\d.]+ MB echoed byte-exact over 4 streams/
  end

  test "examples/chat.exs: every client hears every message" do
    {status, out} = run_example!("chat.exs")
    assert status == 0, out
    assert out =~ "PASS: 3 clients, 7 messages"
  end

  test "examples/datagram_demo.exs echoes datagrams, none corrupted" do
    {status, out} = run_example!("datagram_demo.exs")
    assert status == 0, out
    assert [_, echoed] = Regex.run(~r/echoed (\d+), lost \d+/, out), out
    assert String.to_integer(echoed) > 0
    assert out =~ "corrupted 0"
    assert out =~ ~r/^done$/m
  end

  test "examples/file_transfer.exs sends a file and the digests match" do
    {status, out} = run_example!("file_transfer.exs")
    assert status == 0, out
    assert out =~ ~r/PASS: 2\.1 MB sent and verified by SHA-256/
  end

  @tag :tmp_dir
  test "examples/echo_server.exs and echo_client.exs, the two-terminal pair", %{tmp_dir: dir} do
    prefix = Path.join(dir, "selfsigned")

    server =
      start_example("echo_server.exs", ["--port", "0", "--cert", prefix, "--connections", "1"])

    # The server writes the certificate, then says where it listens.
    {server_out, port} =
      await_output(server, "", fn out ->
        case Regex.run(~r/listening on 127\.0\.0\.1:(\d+)/, out) do
          [_, port] -> {:ok, port}
          nil -> :more
        end
      end)

    assert server_out =~ "wrote a development certificate: #{prefix}.pem"

    {status, client_out} =
      run_example!("echo_client.exs", [
        "--port",
        port,
        "--cacert",
        prefix <> ".pem",
        "hello",
        "quic streams"
      ])

    assert status == 0, client_out

    assert client_out =~
             "connected to localhost:#{port} (ALPN quichex-echo, certificate verified)"

    assert client_out =~ ~r/^echo: hello$/m
    assert client_out =~ ~r/^echo: quic streams$/m
    assert client_out =~ ~r/^closed$/m

    {status, server_out} = await_exit(server, server_out)
    assert status == 0, server_out
    assert server_out =~ ~r/^connection from 127\.0\.0\.1:\d+$/m
    assert server_out =~ "served 1 connection(s), bye"
  end

  ## Helpers

  defp run_example!(script, args \\ []) do
    script |> start_example(args) |> await_exit("")
  end

  defp start_example(script, args) do
    mix = System.find_executable("mix") || flunk("mix is not on the PATH")

    # --no-compile: run this very build (the test run compiled it);
    # --no-deps-check: there are no deps to check.
    args = ["run", "--no-compile", "--no-deps-check", Path.join("examples", script) | args]

    env = [
      {~c"MIX_ENV", Atom.to_charlist(Mix.env())},
      {~c"QUICHEX_EXAMPLE_SHORT", ~c"1"}
    ]

    port =
      Port.open({:spawn_executable, mix}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        args: args,
        env: env,
        cd: @root
      ])

    {port, System.monotonic_time(:millisecond) + @deadline_ms}
  end

  # Output until `done?` says {:ok, value}; returns {output, value}.
  defp await_output({port, deadline} = example, out, done?) do
    case done?.(out) do
      {:ok, value} ->
        {out, value}

      :more ->
        receive do
          {^port, {:data, data}} ->
            await_output(example, out <> data, done?)

          {^port, {:exit_status, status}} ->
            flunk("example exited (#{status}) early:\n#{out}")
        after
          max(deadline - System.monotonic_time(:millisecond), 0) ->
            kill(port)
            flunk("example gave no expected output within #{@deadline_ms} ms:\n#{out}")
        end
    end
  end

  defp await_exit({port, deadline} = example, out) do
    receive do
      {^port, {:data, data}} ->
        await_exit(example, out <> data)

      {^port, {:exit_status, status}} ->
        {status, out}
    after
      max(deadline - System.monotonic_time(:millisecond), 0) ->
        kill(port)
        flunk("example did not exit within #{@deadline_ms} ms:\n#{out}")
    end
  end

  # The VM of an example that hangs: killed by its OS pid.
  defp kill(port) do
    case Port.info(port, :os_pid) do
      {:os_pid, pid} -> System.cmd("kill", ["-KILL", Integer.to_string(pid)])
      nil -> :ok
    end
  end
end
