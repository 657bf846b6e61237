defmodule Quichex.Soak.CyclesTest do
  # 10,000 connect / open stream / echo / close cycles (short form: 300),
  # eight at a time: processes, ports, sockets, ETS tables and their sizes
  # come back to their baseline, :erlang.memory(:total) drifts less than
  # 2 MB after a GC, and no native connection resource outlives its
  # connection.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}
  alias Quichex.Test.Soak

  @moduletag timeout: 300_000

  test "connect / echo / close cycles leave nothing behind" do
    count = Soak.size(10_000, 300)
    {listener, port} = start_listener(handler: Soak.Echo)
    on_exit(fn -> Listener.stop(listener) end)

    cycle = fn i ->
      conn = connect!(port, active: false)
      Soak.echo!(conn, "cycle #{i}")
      :ok = Connection.close(conn)
    end

    # Warm up, so what starts lazily (and the code) is there before counting.
    1..16 |> Task.async_stream(cycle, max_concurrency: 8) |> Elixir.Stream.run()
    idle = fn -> match?({:ok, %{connections: 0, routes: 0}}, Listener.stats(listener)) end
    eventually(idle, 15_000, 20)
    base = Soak.idle_baseline()
    started = Soak.now_ms()

    1..count
    |> Task.async_stream(cycle, max_concurrency: 8, timeout: 30_000)
    |> Enum.each(fn result -> assert {:ok, :ok} = result end)

    eventually(idle, 15_000, 20)
    assert {:ok, %{accepted: accepted}} = Listener.stats(listener)
    assert accepted == count + 16
    after_ = Soak.back_to_baseline!(base, 2 * 1_048_576)
    Soak.report("#{count} connect/echo/close cycles", started, base, after_)
  end
end
