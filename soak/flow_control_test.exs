defmodule Quichex.Soak.FlowControlTest do
  # Readers that do not keep up: a peer that opens as many streams as it
  # may and never reads what the server sends on them, and a reader that
  # takes 1 byte every 10 ms from a 100 MB sender. For 20 s (short form:
  # 3 s), sampled throughout: memory stays bounded by the flow-control
  # windows, and the senders get no further than the windows let them.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}
  alias Quichex.Connection.Driver
  alias Quichex.Test.Soak

  @moduletag timeout: 300_000
  # Stream windows, and the chunk the server sends at a time.
  @window 65_536
  @chunk 65_536

  defmodule Firehose do
    # On a stream's first bytes, sends up to `total` bytes on it, counting
    # what each send took in `counter` (a :counters ref), until the stream
    # or its connection ends.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(_data, stream, %{total: total, counter: counter} = state) do
      chunk = :binary.copy("f", 65_536)
      pour(stream, chunk, div(total, byte_size(chunk)), counter)
      {:continue, state}
    end

    defp pour(_stream, _chunk, 0, _counter), do: :ok

    defp pour(stream, chunk, left, counter) do
      case Stream.send(stream, chunk, timeout: 60_000) do
        :ok ->
          :counters.add(counter, 1, byte_size(chunk))
          pour(stream, chunk, left - 1, counter)

        {:error, _closed} ->
          :ok
      end
    end
  end

  defp windows(streams) do
    [
      initial_max_streams_bidi: streams,
      initial_max_stream_data_bidi_local: @window,
      initial_max_stream_data_bidi_remote: @window,
      initial_max_data: streams * @window,
      # No window auto-tuning: the windows stay as set.
      max_stream_window: @window,
      max_connection_window: streams * @window
    ]
  end

  defp firehose!(streams, total) do
    counter = :counters.new(1, [])

    {listener, port} =
      start_listener(
        handler: Firehose,
        handler_options: %{total: total, counter: counter},
        config_opts: windows(streams)
      )

    on_exit(fn -> Listener.stop(listener) end)
    conn = connect!(port, active: false, config_opts: windows(streams))
    {listener, conn, counter}
  end

  # What one stream may hold that its reader has not taken: what its
  # process read ahead, the receive window, and the sender's chunk in flight.
  defp per_stream, do: Driver.window() + @window + @chunk

  # Samples :erlang.memory(:total) every 50 ms for `ms`, running `step`
  # between samples; returns the largest.
  defp sample_for(ms, step) do
    deadline = Soak.now_ms() + ms
    sample_loop(deadline, step, :erlang.memory(:total))
  end

  defp sample_loop(deadline, step, most) do
    if Soak.now_ms() >= deadline do
      most
    else
      step.()
      sample_loop(deadline, step, max(most, :erlang.memory(:total)))
    end
  end

  # Closes the connection: both sides end and everything comes back.
  defp finish!(listener, conn, base, started, name) do
    :ok = Connection.close(conn)
    eventually(fn -> match?({:ok, %{connections: 0}}, Listener.stats(listener)) end, 10_000, 20)
    after_ = Soak.back_to_baseline!(base, 5 * 1_048_576)
    Soak.report(name, started, base, after_)
  end

  defp wait(ms) do
    receive do
    after
      ms -> :ok
    end
  end

  test "a peer that opens the most streams it may and never reads" do
    streams = Soak.size(100, 16)
    duration = Soak.size(20_000, 3_000)
    {listener, conn, counter} = firehose!(streams, 100_000_000)
    base = Soak.snapshot()
    started = Soak.now_ms()

    opened =
      for _ <- 1..streams do
        {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
        :ok = Stream.send(stream, "go")
        stream
      end

    # The windows fill, then nothing moves.
    eventually(fn -> :counters.get(counter, 1) >= streams * @window end, 30_000, 20)
    most = sample_for(duration, fn -> wait(50) end)
    poured = :counters.get(counter, 1)

    assert poured <= streams * per_stream(),
           "the server got #{poured} bytes out to readers that never read"

    assert most - base.memory <= streams * 2 * per_stream() + 8 * 1_048_576,
           "memory grew by #{most - base.memory} bytes"

    assert Enum.all?(opened, &Process.alive?/1)

    finish!(
      listener,
      conn,
      base,
      started,
      "#{streams} streams never read for #{duration} ms " <>
        "(peak +#{Float.round((most - base.memory) / 1_048_576, 1)} MB, #{poured} bytes poured)"
    )
  end

  test "a reader taking 1 byte every 10 ms from a 100 MB sender" do
    duration = Soak.size(20_000, 3_000)
    {listener, conn, counter} = firehose!(1, 100_000_000)
    base = Soak.snapshot()
    started = Soak.now_ms()
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "go")

    read = :counters.new(1, [])

    most =
      sample_for(duration, fn ->
        assert {:ok, <<?f>>, false} = Stream.recv(stream, length: 1, timeout: 5_000)
        :counters.add(read, 1, 1)
        wait(10)
      end)

    read = :counters.get(read, 1)
    poured = :counters.get(counter, 1)
    assert read >= div(duration, 10) / 4
    assert poured >= @window, "the sender never filled the window"
    assert poured <= read + per_stream(), "#{poured} bytes poured for #{read} read"
    assert most - base.memory <= 2 * per_stream() + 4 * 1_048_576

    finish!(
      listener,
      conn,
      base,
      started,
      "1 byte per 10 ms for #{duration} ms from a 100 MB " <>
        "sender (#{read} bytes read, peak +#{Float.round((most - base.memory) / 1_048_576, 2)} MB)"
    )
  end
end
