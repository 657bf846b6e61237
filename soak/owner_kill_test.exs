defmodule Quichex.Soak.OwnerKillTest do
  # Owners killed with :kill in the middle of a transfer, 500 times (short
  # form: 30), four at a time: the connection and its streams go away
  # within 2 s, the server's side ends too, and nothing leaks.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}
  alias Quichex.Test.Soak

  @moduletag timeout: 300_000

  # Connects, opens a stream and echoes through the listener at `port`
  # until killed (at most `chunks` chunks), telling `test` once the transfer
  # is under way.
  defp owner(test, port, chunks) do
    conn = connect!(port)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional)
    chunk = :binary.copy("k", 16_384)
    :ok = Stream.send(stream, chunk)
    send(test, {:transferring, self(), conn, stream})

    for _ <- 1..chunks do
      :ok = Stream.send(stream, chunk)
    end

    receive do: (:never -> :ok)
  end

  defp kill_one(port) do
    test = self()
    owner = spawn(fn -> owner(test, port, 100_000) end)
    owner_ref = Process.monitor(owner)

    assert_receive {:transferring, ^owner, conn, stream}, 10_000
    refs = for pid <- [conn, stream], do: Process.monitor(pid)
    killed = Soak.now_ms()
    Process.exit(owner, :kill)
    assert_receive {:DOWN, ^owner_ref, :process, ^owner, :killed}

    for ref <- refs do
      assert_receive {:DOWN, ^ref, :process, _pid, _reason}, 2_000
    end

    Soak.now_ms() - killed
  end

  test "owners killed mid-transfer take their connections and streams with them" do
    count = Soak.size(500, 30)
    {listener, port} = start_listener(handler: Soak.Echo)
    on_exit(fn -> Listener.stop(listener) end)
    idle = fn -> match?({:ok, %{connections: 0, routes: 0}}, Listener.stats(listener)) end

    # Warm up, so what starts lazily is there before counting.
    kill_one(port)
    eventually(idle, 10_000, 20)
    base = Soak.idle_baseline()
    started = Soak.now_ms()

    gone_ms =
      1..count
      |> Task.async_stream(fn _ -> kill_one(port) end, max_concurrency: 4, timeout: 30_000)
      |> Enum.map(fn {:ok, ms} -> ms end)

    # The server's side of each went too.
    eventually(idle, 10_000, 20)
    assert {:ok, %{accepted: accepted}} = Listener.stats(listener)
    assert accepted == count + 1
    after_ = Soak.back_to_baseline!(base, 2 * 1_048_576)

    Soak.report(
      "#{count} owners killed mid-transfer (connection and stream gone in " <>
        "#{Enum.max(gone_ms)} ms at most)",
      started,
      base,
      after_
    )
  end
end
