# The echo demo: `make demo` (or `mix run examples/echo.exs`).
#
# Starts a Quichex.Listener whose Echo handler sends every stream back, then
# a client on loopback opens 16 bidirectional streams, sends 4 MB on each,
# checks every echoed byte and prints the throughput. The certificate comes
# from Quichex.DevCert (what `mix quichex.gen.cert` writes), in a temporary
# directory. With QUICHEX_EXAMPLE_SHORT=1 (how `make test` runs every
# example) it sends 4 streams of 256 KB.

defmodule Demo.Echo do
  @moduledoc "Echoes each stream back to the peer, then finishes it."
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_data(data, stream, state) do
    :ok = Quichex.Stream.send(stream, data, timeout: 30_000)
    {:continue, state}
  end

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    :ok = Quichex.Stream.close(stream)
    {:close, state}
  end
end

defmodule Demo do
  @short System.get_env("QUICHEX_EXAMPLE_SHORT") in ["1", "true"]
  @streams if @short, do: 4, else: 16
  @size if @short, do: 256 * 1024, else: 4 * 1024 * 1024
  @chunk 256 * 1024
  @alpn "quichex-echo"

  def run do
    dir = Path.join(System.tmp_dir!(), "quichex-demo-#{System.unique_integer([:positive])}")
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))

    server_config =
      Quichex.Config.new(
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: cert,
        load_priv_key_from_pem_file: key
      )

    {:ok, listener} =
      Quichex.Listener.start_link(
        ip: {127, 0, 0, 1},
        port: 0,
        config: server_config,
        handler: Demo.Echo
      )

    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)

    IO.puts(
      "quiche #{Quichex.quiche_version()} | listener with the Echo handler on 127.0.0.1:#{port}"
    )

    client_config =
      Quichex.Config.new(application_protos: [@alpn], load_verify_locations_from_file: cert)

    {:ok, conn} = Quichex.Connection.connect(host: "localhost", port: port, config: client_config)
    :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
    {:ok, info} = Quichex.Connection.info(conn)
    IO.puts("connected: ALPN #{info.alpn}, certificate for #{info.server_name} verified")

    IO.puts(
      "sending #{@streams} streams x #{div(@size, 1024)} KB and checking every echoed byte..."
    )

    started = System.monotonic_time(:microsecond)
    parent = self()

    tasks =
      for i <- 1..@streams do
        Task.async(fn ->
          result = echo_one(conn, i)
          send(parent, {:done, i, result})
          result
        end)
      end

    results = progress(0, [])
    Enum.each(tasks, &Task.await(&1, 60_000))
    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000
    {:ok, stats} = Quichex.Connection.stats(conn)
    :ok = Quichex.Connection.close(conn, error_code: 0, reason: "demo done")
    Quichex.Listener.stop(listener)
    File.rm_rf(dir)

    total = @streams * @size
    mb = total / 1_000_000
    failed = for {i, {:error, reason}} <- results, do: {i, reason}

    IO.puts(
      "rtt #{stats.rtt} us, #{stats.packets_sent} packets sent, #{stats.packets_lost} lost, cwnd #{stats.cwnd} bytes"
    )

    if failed == [] do
      IO.puts(
        "PASS: #{Float.round(mb, 1)} MB echoed byte-exact over #{@streams} streams in #{Float.round(seconds, 2)} s " <>
          "(#{Float.round(2 * mb / seconds, 1)} MB/s both ways)"
      )
    else
      IO.puts("FAIL: #{inspect(failed)}")
      System.halt(1)
    end
  end

  defp progress(done, acc) when done == @streams, do: acc

  defp progress(done, acc) do
    receive do
      {:done, i, result} ->
        done = done + 1
        bar = String.duplicate("#", done) <> String.duplicate(".", @streams - done)
        status = if result == :ok, do: "ok", else: "FAILED #{inspect(result)}"
        IO.puts("  [#{bar}] stream #{i}: #{status}")
        progress(done, [{i, result} | acc])
    after
      60_000 -> [{:timeout, {:error, :timeout}} | acc]
    end
  end

  defp echo_one(conn, i) do
    :rand.seed(:exsss, {i, i, i})
    payload = :rand.bytes(@size)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
    reader = Task.async(fn -> read_all(stream, []) end)

    for <<chunk::binary-size(@chunk) <- payload>> do
      :ok = Quichex.Stream.send(stream, chunk, timeout: 30_000)
    end

    :ok = Quichex.Stream.close(stream)

    case Task.await(reader, 60_000) do
      {:ok, ^payload} -> :ok
      {:ok, other} -> {:error, {:mismatch, byte_size(other)}}
      error -> error
    end
  end

  defp read_all(stream, acc) do
    case Quichex.Stream.recv(stream, timeout: 30_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data])}
      {:ok, data, false} -> read_all(stream, [acc | data])
      {:error, reason} -> {:error, reason}
    end
  end
end

Demo.run()
