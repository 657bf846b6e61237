# Datagrams: `mix run examples/datagram_demo.exs`.
#
# Unreliable DATAGRAM frames (RFC 9221) next to QUIC's reliable streams. A
# Quichex.Listener runs the DgramEcho handler, whose handle_datagram/3 sends
# every datagram straight back with Quichex.Connection.dgram_send/2. A client
# on loopback, with `enable_dgram: true` in its config like the listener's,
# sends 5,000 datagrams of 1,000 bytes, each numbered in its first 8 bytes.
# When the send queue is full (`{:error, :queue_full}`) it waits up to a
# millisecond for echoes before trying again. Echoes arrive as
# `{:quic_dgram, conn, data}` messages; the client checks each one's bytes,
# counts those that come back out of order, and prints how many were sent,
# echoed and lost, and the rate. Datagrams are never retransmitted, so some
# loss is allowed; a corrupted echo fails the run. Every wait is bounded: the
# script ends within a few seconds. The self-signed certificate comes from
# Quichex.DevCert (what `mix quichex.gen.cert` writes), in a temporary
# directory removed at the end. With QUICHEX_EXAMPLE_SHORT=1 (how `make test`
# runs every example) it sends 500 datagrams.

defmodule Demo.DgramEcho do
  @moduledoc "Sends every datagram back to the peer; one the full send queue refuses is dropped."
  use Quichex.Handler

  @impl Quichex.Handler
  def handle_datagram(data, conn, state) do
    _ = Quichex.Connection.dgram_send(conn, data)
    {:continue, state}
  end
end

defmodule Demo do
  @count if System.get_env("QUICHEX_EXAMPLE_SHORT") in ["1", "true"], do: 500, else: 5_000
  @size 1_000
  @alpn "quichex-dgram"
  # Sending gives up after this long (a stalled connection cannot hang the script).
  @send_ms 10_000
  # After the last send: wait for echoes until none came for this long...
  @quiet_ms 300
  # ...and no longer than this.
  @drain_ms 3_000

  def run do
    dir = Path.join(System.tmp_dir!(), "quichex-dgram-#{System.unique_integer([:positive])}")
    %{cert: cert, key: key} = Quichex.DevCert.write!(output: Path.join(dir, "selfsigned"))

    server_config =
      Quichex.Config.new(
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: cert,
        load_priv_key_from_pem_file: key,
        enable_dgram: true
      )

    {:ok, listener} =
      Quichex.Listener.start_link(
        ip: {127, 0, 0, 1},
        port: 0,
        config: server_config,
        handler: Demo.DgramEcho
      )

    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)

    IO.puts(
      "quiche #{Quichex.quiche_version()} | listener with the DgramEcho handler on 127.0.0.1:#{port}"
    )

    client_config =
      Quichex.Config.new(
        application_protos: [@alpn],
        load_verify_locations_from_file: cert,
        enable_dgram: true
      )

    {:ok, conn} = Quichex.Connection.connect(host: "localhost", port: port, config: client_config)
    :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
    {:ok, max} = Quichex.Connection.dgram_max_size(conn)
    IO.puts("connected: the server takes datagrams of up to #{max} bytes")
    IO.puts("sending #{@count} datagrams x #{@size} bytes, each numbered, and counting echoes...")

    started = System.monotonic_time(:microsecond)

    acc = %{
      conn: conn,
      sent: 0,
      echoed: 0,
      highest: -1,
      out_of_order: 0,
      corrupt: 0,
      queue_full: 0,
      give_up_at: System.monotonic_time(:millisecond) + @send_ms
    }

    acc = send_all(acc, 0)
    sent_in = System.monotonic_time(:microsecond) - started
    acc = drain(acc, System.monotonic_time(:millisecond) + @drain_ms)
    seconds = (System.monotonic_time(:microsecond) - started) / 1_000_000

    {:ok, stats} = Quichex.Connection.stats(conn)
    :ok = Quichex.Connection.close(conn, error_code: 0, reason: "demo done")
    Quichex.Listener.stop(listener)
    File.rm_rf(dir)

    lost = acc.sent - acc.echoed

    IO.puts(
      "sent #{acc.sent} in #{Float.round(sent_in / 1_000, 1)} ms; the send queue was full #{acc.queue_full} times (each retried)"
    )

    IO.puts(
      "echoed #{acc.echoed}, lost #{lost} (#{Float.round(lost * 100 / max(acc.sent, 1), 2)}%), " <>
        "out of order #{acc.out_of_order}, corrupted #{acc.corrupt}"
    )

    IO.puts(
      "#{round(acc.echoed / seconds)} datagrams/s echoed " <>
        "(#{Float.round(acc.echoed * @size / seconds / 1_000_000, 1)} MB/s each way) in #{Float.round(seconds, 2)} s"
    )

    IO.puts(
      "client stats: dgrams_sent #{stats.dgrams_sent}, dgrams_received #{stats.dgrams_received}, " <>
        "dropped on send #{stats.dgrams_dropped_on_send}, dropped on receive #{stats.dgrams_dropped_on_receive}, " <>
        "packets lost #{stats.packets_lost}"
    )

    cond do
      acc.corrupt > 0 ->
        IO.puts("FAIL: #{acc.corrupt} echoes did not match what was sent")
        System.halt(1)

      acc.echoed == 0 ->
        IO.puts("FAIL: no datagram came back")
        System.halt(1)

      true ->
        IO.puts("done")
    end
  end

  # Datagram `seq`: its number, then bytes that follow from the number, so
  # every echo can be checked on its own.
  defp datagram(seq), do: [<<seq::64>>, :binary.copy(<<rem(seq, 251)>>, @size - 8)]

  defp send_all(acc, seq) when seq == @count, do: acc

  defp send_all(acc, seq) do
    case Quichex.Connection.dgram_send(acc.conn, datagram(seq)) do
      :ok ->
        %{acc | sent: acc.sent + 1} |> take_echoes() |> send_all(seq + 1)

      {:error, :queue_full} ->
        # The queue empties as quiche sends: retry the same datagram after
        # an echo or a millisecond, until the send deadline.
        acc = %{acc | queue_full: acc.queue_full + 1}

        if System.monotonic_time(:millisecond) < acc.give_up_at,
          do: acc |> await_echo(1) |> send_all(seq),
          else: acc

      {:error, reason} ->
        raise "dgram_send failed: #{inspect(reason)}"
    end
  end

  defp drain(acc, deadline) do
    if acc.echoed >= acc.sent or System.monotonic_time(:millisecond) >= deadline do
      acc
    else
      conn = acc.conn

      receive do
        {:quic_dgram, ^conn, data} -> acc |> echoed(data) |> drain(deadline)
      after
        @quiet_ms -> acc
      end
    end
  end

  defp take_echoes(%{conn: conn} = acc) do
    receive do
      {:quic_dgram, ^conn, data} -> acc |> echoed(data) |> take_echoes()
    after
      0 -> acc
    end
  end

  defp await_echo(%{conn: conn} = acc, ms) do
    receive do
      {:quic_dgram, ^conn, data} -> echoed(acc, data)
    after
      ms -> acc
    end
  end

  defp echoed(acc, <<seq::64, _::binary>> = data) do
    if seq < @count and data == IO.iodata_to_binary(datagram(seq)) do
      out_of_order = if seq < acc.highest, do: acc.out_of_order + 1, else: acc.out_of_order
      %{acc | echoed: acc.echoed + 1, highest: max(seq, acc.highest), out_of_order: out_of_order}
    else
      %{acc | corrupt: acc.corrupt + 1}
    end
  end

  defp echoed(acc, _short), do: %{acc | corrupt: acc.corrupt + 1}
end

Demo.run()
