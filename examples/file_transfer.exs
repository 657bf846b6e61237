# File transfer: `mix run examples/file_transfer.exs`.
#
# A Quichex.Listener runs the FileSink handler: for each bidirectional
# stream a client opens it hashes every byte it receives with SHA-256 and,
# when the client finishes the stream, answers "<hex digest> <byte count>"
# on the same stream. The client generates a 50 MiB file in a temporary
# directory, sends it in 256 KiB chunks (each `Quichex.Stream.send/3` returns
# only once quiche has taken the chunk, so flow control paces the loop),
# prints progress and MB/s, and checks the server's digest against its own.
# The self-signed certificate comes from Quichex.DevCert (what
# `mix quichex.gen.cert` writes), in the same temporary directory, which is
# removed at the end. Loopback only. With QUICHEX_EXAMPLE_SHORT=1 (how
# `make test` runs every example) the file is 2 MiB.

defmodule FileTransfer.Sink do
  @moduledoc "Hashes a stream's bytes; on FIN, replies with the digest and the byte count."
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_stream_open(_stream, _options) do
    {:continue, %{hash: :crypto.hash_init(:sha256), bytes: 0}}
  end

  # Called once per chunk; the stream reads the next chunk from quiche only
  # after this returns, so a slow sink slows the sender.
  @impl Quichex.Handler
  def handle_data(data, _stream, state) do
    {:continue,
     %{hash: :crypto.hash_update(state.hash, data), bytes: state.bytes + byte_size(data)}}
  end

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    digest = state.hash |> :crypto.hash_final() |> Base.encode16(case: :lower)
    # The reply and the FIN go out together.
    :ok = Quichex.Stream.send(stream, "#{digest} #{state.bytes}", fin: true)
    {:close, state}
  end
end

defmodule FileTransfer do
  @size if System.get_env("QUICHEX_EXAMPLE_SHORT") in ["1", "true"],
          do: 2 * 1024 * 1024,
          else: 50 * 1024 * 1024
  @chunk 256 * 1024
  @alpn "quichex-file"

  def run do
    dir = Path.join(System.tmp_dir!(), "quichex-file-#{System.unique_integer([:positive])}")

    result =
      try do
        transfer(dir)
      after
        File.rm_rf!(dir)
      end

    if result != :ok, do: System.halt(1)
  end

  defp transfer(dir) do
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))
    path = generate_file!(dir)

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
        handler: FileTransfer.Sink
      )

    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)
    IO.puts("listener with the FileTransfer.Sink handler on 127.0.0.1:#{port}")

    client_config =
      Quichex.Config.new(application_protos: [@alpn], load_verify_locations_from_file: cert)

    {:ok, conn} =
      Quichex.Connection.connect(
        host: {127, 0, 0, 1},
        port: port,
        server_name: "localhost",
        config: client_config
      )

    :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)

    IO.puts("sending #{Path.basename(path)} (#{@size} bytes) in #{div(@chunk, 1024)} KiB chunks")
    started = System.monotonic_time(:microsecond)
    local_digest = send_file!(stream, path, started)
    {:ok, reply} = read_reply(stream, [])
    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000

    {:ok, stats} = Quichex.Connection.stats(conn)
    :ok = Quichex.Connection.close(conn, error_code: 0, reason: "done")
    :ok = Quichex.Listener.stop(listener)

    IO.puts("server replied: #{reply}")
    IO.puts("local sha256:   #{local_digest} #{@size}")

    IO.puts("rtt #{stats.rtt} us, #{stats.packets_sent} packets sent, #{stats.packets_lost} lost")

    mb = @size / 1_000_000

    if reply == "#{local_digest} #{@size}" do
      IO.puts(
        "PASS: #{Float.round(mb, 1)} MB sent and verified by SHA-256 in " <>
          "#{Float.round(seconds, 2)} s (#{Float.round(mb / seconds, 1)} MB/s)"
      )
    else
      IO.puts("FAIL: digest or size mismatch")
      :error
    end
  end

  # Reads the file chunk by chunk; the last chunk carries the FIN, so no
  # separate empty FIN is needed. Returns the local SHA-256 in hex.
  defp send_file!(stream, path, started) do
    file = File.open!(path, [:read, :binary, :raw])

    try do
      send_chunks(stream, file, :crypto.hash_init(:sha256), 0, started)
    after
      File.close(file)
    end
  end

  defp send_chunks(stream, file, hash, sent, started) do
    case IO.binread(file, @chunk) do
      data when is_binary(data) ->
        sent = sent + byte_size(data)
        :ok = Quichex.Stream.send(stream, data, fin: sent == @size, timeout: 30_000)
        hash = :crypto.hash_update(hash, data)
        progress(sent, started)
        send_chunks(stream, file, hash, sent, started)

      :eof ->
        hash |> :crypto.hash_final() |> Base.encode16(case: :lower)
    end
  end

  # One line per 10% of the file.
  defp progress(sent, started) do
    step = div(@size, 10)

    if rem(sent, step) < @chunk and sent >= step do
      seconds = max(System.monotonic_time(:microsecond) - started, 1) / 1_000_000
      pct = div(sent * 100, @size)
      rate = Float.round(sent / 1_000_000 / seconds, 1)
      IO.puts("  #{String.pad_leading(Integer.to_string(pct), 3)}%  #{sent} bytes  #{rate} MB/s")
    end
  end

  defp read_reply(stream, acc) do
    case Quichex.Stream.recv(stream, timeout: 30_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data])}
      {:ok, data, false} -> read_reply(stream, [acc | data])
      {:error, reason} -> {:error, reason}
    end
  end

  defp generate_file!(dir) do
    path = Path.join(dir, "payload.bin")

    File.open!(path, [:write, :binary, :raw], fn file ->
      for _ <- 1..div(@size, 1024 * 1024),
          do: :ok = IO.binwrite(file, :crypto.strong_rand_bytes(1024 * 1024))
    end)

    path
  end
end

FileTransfer.run()
