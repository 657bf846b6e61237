defmodule Quichex.Test.Soak do
  @moduledoc false
  # Sizes and measurements for the soak and abuse suite in soak/.
  #
  # QUICHEX_SOAK=full (`make soak`) runs the sizes issue 15 names; anything
  # else runs the same tests with small sizes (`make test`).

  import ExUnit.Assertions
  import Quichex.Test.Helpers, only: [eventually: 3]

  alias Quichex.{Connection, Stream}

  defmodule Echo do
    @moduledoc false
    # Echoes every stream back and closes it after the peer's FIN.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      # The peer may have gone (owner killed): its stream is then reset.
      _ = Quichex.Stream.send(stream, data)
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      _ = Quichex.Stream.close(stream)
      {:close, state}
    end
  end

  def full?, do: System.get_env("QUICHEX_SOAK") == "full"

  @doc "`full` under `make soak`, `short` otherwise."
  def size(full, short), do: if(full?(), do: full, else: short)

  @doc "Garbage-collects every process, then `:erlang.memory(:total)`."
  def memory do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    :erlang.memory(:total)
  end

  @doc "What must come back to its baseline after a scenario."
  def snapshot do
    %{
      processes: length(Process.list()),
      ports: length(:erlang.ports()),
      sockets: :socket.number_of(),
      ets_tables: length(:ets.all()),
      ets_words: ets_words(),
      native_connections: Quichex.Native.connection_live_count(),
      memory: memory()
    }
  end

  # A table may go between :ets.all/0 and :ets.info/2.
  defp ets_words do
    Enum.reduce(:ets.all(), 0, fn table, acc ->
      case :ets.info(table, :memory) do
        words when is_integer(words) -> acc + words
        _ -> acc
      end
    end)
  end

  @doc """
  The baseline of a scenario with no connection open: waits (up to 5 s)
  for the connections of earlier work to be freed, so they do not count
  as headroom, then takes a snapshot.
  """
  def idle_baseline do
    deadline = now_ms() + 5_000
    idle_wait(deadline)
    snapshot()
  end

  defp idle_wait(deadline) do
    if Quichex.Native.connection_live_count() > 0 and now_ms() < deadline do
      for pid <- Process.list(), do: :erlang.garbage_collect(pid)
      Process.sleep(20)
      idle_wait(deadline)
    end
  end

  @doc """
  Waits (up to `timeout`) until every count is back to at most its baseline
  and memory within `slack` bytes of it (ETS within `slack` too); returns
  the last snapshot. Fails naming what did not come back.
  """
  def back_to_baseline!(base, slack, timeout \\ 30_000) do
    try do
      eventually(fn -> settled(base, slack) end, timeout, 200)
    rescue
      ExUnit.AssertionError ->
        now = snapshot()
        flunk("not back to baseline:\n before #{inspect(base)}\n after  #{inspect(now)}")
    end
  end

  defp settled(base, slack) do
    now = snapshot()

    ok? =
      now.processes <= base.processes and now.ports <= base.ports and
        now.sockets <= base.sockets and now.ets_tables <= base.ets_tables and
        now.native_connections <= base.native_connections and
        (now.ets_words - base.ets_words) * :erlang.system_info(:wordsize) <= slack and
        now.memory - base.memory <= slack

    if ok?, do: now, else: nil
  end

  @doc "Prints one figure line for PERFORMANCE.md."
  def report(name, started_ms, base, after_) do
    secs = (System.monotonic_time(:millisecond) - started_ms) / 1_000
    mb = fn bytes -> Float.round(bytes / 1_048_576, 2) end

    IO.puts(
      "\nsoak #{if full?(), do: "full", else: "short"} | #{name} | " <>
        "#{:erlang.float_to_binary(secs, decimals: 1)} s | memory #{mb.(base.memory)} MB -> " <>
        "#{mb.(after_.memory)} MB (#{mb.(after_.memory - base.memory)} MB) | " <>
        "processes #{base.processes} -> #{after_.processes} | " <>
        "native connections #{base.native_connections} -> #{after_.native_connections}"
    )
  end

  def now_ms, do: System.monotonic_time(:millisecond)

  @doc "Opens a stream on `conn`, echoes `data` through it and closes it."
  def echo!(conn, data) do
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, data, fin: true)
    assert read_all(stream, []) == data
  end

  def read_all(stream, acc) do
    case Stream.recv(stream, timeout: 10_000) do
      {:ok, data, true} -> IO.iodata_to_binary([acc | data])
      {:ok, data, false} -> read_all(stream, [acc | data])
    end
  end

  @doc """
  Sends every datagram `next.(i)` returns for `i` in `1..count` to the
  listener at `port`, round robin from `sources` UDP sockets on loopback
  (as if from as many clients), paced on the listener's
  `datagrams_received` so its socket buffers drop none. Returns
  `%{sent: %{source => bytes}, received: %{source => bytes}}`: what each
  source sent and what came back to it, counted as it arrives.
  """
  def flood(listener, port, count, sources, next) do
    parent = self()
    collector = spawn_link(fn -> collect(parent, sources) end)
    sockets = receive do: ({:sockets, ^collector, sockets} -> sockets)
    sockets = List.to_tuple(sockets)
    {:ok, %{datagrams_received: start}} = Quichex.Listener.stats(listener)

    sent =
      Enum.reduce(1..count, %{}, fn i, sent ->
        source = rem(i, sources)
        datagram = next.(i)
        :ok = :gen_udp.send(elem(sockets, source), {127, 0, 0, 1}, port, datagram)

        if rem(i, 500) == 0,
          do: eventually(fn -> received(listener) - start >= i - 1_000 end, 30_000, 1)

        Map.update(sent, source, IO.iodata_length(datagram), &(&1 + IO.iodata_length(datagram)))
      end)

    eventually(fn -> received(listener) - start >= count end, 30_000, 5)
    send(collector, {:done, self()})
    received = receive do: ({:received, ^collector, received} -> received)
    %{sent: sent, received: received}
  end

  defp received(listener) do
    {:ok, %{datagrams_received: n}} = Quichex.Listener.stats(listener)
    n
  end

  # Owns the source sockets (active), counts the bytes each gets back; on
  # :done, waits until nothing more arrived for 500 ms.
  defp collect(parent, sources) do
    sockets =
      for _ <- 1..sources do
        {:ok, socket} =
          :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: true, recbuf: 4_194_304])

        socket
      end

    index = sockets |> Enum.with_index() |> Map.new()
    send(parent, {:sockets, self(), sockets})
    counts = count_loop(index, %{}, :infinity)

    receive do
      {:done, from} ->
        counts = count_loop(index, counts, 500)
        Enum.each(sockets, &:gen_udp.close/1)
        send(from, {:received, self(), counts})
    end
  end

  defp count_loop(index, counts, quiet) do
    receive do
      {:udp, socket, _ip, _port, data} ->
        source = Map.fetch!(index, socket)

        count_loop(
          index,
          Map.update(counts, source, byte_size(data), &(&1 + byte_size(data))),
          quiet
        )

      {:done, _} = done when quiet == :infinity ->
        send(self(), done)
        counts
    after
      quiet -> counts
    end
  end

  @doc "Asserts no source got back more than 3x what it sent; returns the bytes back."
  def assert_amplification!(%{sent: sent, received: received}) do
    for {source, back} <- received do
      out = Map.get(sent, source, 0)
      assert back <= 3 * out, "source #{source} got #{back} bytes back for #{out} sent"
    end

    received |> Map.values() |> Enum.sum()
  end
end
