defmodule Quichex.PacingTest do
  # quiche's pacer tells when each packet should leave (SendInfo.at); the
  # connection releases its batches at that time, with one timer.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}

  defmodule Sink do
    # Reads everything and answers the byte count at the FIN.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_stream_open(_stream, state), do: {:continue, Map.put(state, :n, 0)}

    @impl Quichex.Handler
    def handle_data(data, _stream, state),
      do: {:continue, %{state | n: state.n + byte_size(data)}}

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      :ok = Quichex.Stream.send(stream, Integer.to_string(state.n), fin: true)
      {:close, state}
    end
  end

  defp transfer(port, size, config_opts) do
    conn = connect!(port, config_opts: config_opts)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    started = System.monotonic_time(:millisecond)
    :ok = Stream.send(stream, :binary.copy(<<7>>, size), fin: true, timeout: 60_000)
    {:ok, count, true} = Stream.recv(stream, timeout: 60_000)
    elapsed = System.monotonic_time(:millisecond) - started
    assert String.to_integer(count) == size
    {:ok, %{packets_sent: packets}} = Connection.stats(conn)
    :ok = Connection.close(conn)
    {elapsed, packets}
  end

  # The 90th percentile, over the client's sends, of the bytes it sent in
  # the `window_us` ending at each send (the proxy's arrival times). Not the
  # maximum: a busy machine that deschedules the VM for a moment bunches a
  # few paced batches up, which a percentile ignores and a burst of whole
  # congestion windows does not hide.
  defp p90_window(trace, window_us) do
    sends = for {t, :to_server, bytes} <- trace, do: {t, bytes}
    sums = slide(sends, sends, 0, [], window_us) |> Enum.sort()
    Enum.at(sums, div(length(sums) * 9, 10), 0)
  end

  defp slide([], _tail, _sum, acc, _w), do: acc

  defp slide([{t, b} | rest], tail, sum, acc, w) do
    sum = sum + b
    {tail, sum} = drop_old(tail, sum, t - w)
    slide(rest, tail, sum, [sum | acc], w)
  end

  defp drop_old([{t0, b0} | rest], sum, from) when t0 <= from, do: drop_old(rest, sum - b0, from)
  defp drop_old(tail, sum, _from), do: {tail, sum}

  defp through_proxy(listener_port, config_opts) do
    # 50 ms each way: a 100 ms RTT, so a congestion window is a lot of data.
    {:ok, proxy, port} =
      Quichex.Test.FaultProxy.start_link(
        upstream: {{127, 0, 0, 1}, listener_port},
        delay: 1.0,
        delay_ms: {50, 50},
        trace: 10_000
      )

    config_opts = [cc_algorithm: :bbr, max_pacing_rate: 40] ++ config_opts

    conn =
      connect!(port, host: {127, 0, 0, 1}, server_name: "localhost", config_opts: config_opts)

    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, :binary.copy(<<7>>, 3_000_000), fin: true, timeout: 60_000)
    {:ok, "3000000", true} = Stream.recv(stream, timeout: 60_000)
    {:ok, %{paced_batches: paced}} = Connection.stats(conn)
    :ok = Connection.close(conn)
    {Quichex.Test.FaultProxy.trace(proxy), paced}
  end

  test "batches leave when quiche's pacer says: no congestion-window bursts" do
    {listener, port} = start_listener(handler: Sink, handler_options: %{})
    on_exit(fn -> Listener.stop(listener) end)

    # quiche 0.30 paces with BBRv2 (its Reno and CUBIC send at once). With
    # pacing, the client spreads each window over the round trip (at most 5
    # MB/s here: max_pacing_rate is in Mbit/s); without, it sends it at once.
    {paced_trace, held} = through_proxy(port, enable_pacing: true)
    {unpaced_trace, 0} = through_proxy(port, enable_pacing: false)
    assert held > 100, "only #{held} batches waited for the pacer"

    # Seen on the wire (the proxy's arrival times): over 20 ms, the paced
    # client sends about 125 KB at most; unpaced, whole windows at once.
    paced = p90_window(paced_trace, 20_000)
    unpaced = p90_window(unpaced_trace, 20_000)
    assert paced < unpaced, "p90 #{paced} bytes in 20 ms paced, #{unpaced} unpaced"
  end

  test "a capped pacing rate is honoured: 1 MB at 1 MB/s takes about a second, intact" do
    {listener, port} = start_listener(handler: Sink, handler_options: %{})
    on_exit(fn -> Listener.stop(listener) end)

    # Only the lower bound is checked: a busy machine is slower, never
    # faster. (quiche's BBRv2 also caps its window to the rate.)
    {elapsed, packets} =
      transfer(port, 1_000_000, cc_algorithm: :bbr, enable_pacing: true, max_pacing_rate: 8)

    assert elapsed >= 700, "1 MB went out in #{elapsed} ms, faster than the 1 MB/s cap"
    assert packets > 700
  end
end
