defmodule Quichex.LeakTest do
  # Counts VM-wide processes and sockets: runs alone, after the async tests.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}

  test "1,000 connect/close cycles leave no processes, routes or sockets behind" do
    {listener, port} = start_listener()
    # Warm up once so lazily started things exist before counting.
    warm = connect!(port, active: false)
    :ok = Connection.close(warm)
    eventually(fn -> match?({:ok, %{connections: 0}}, Listener.stats(listener)) end)
    flush_messages()

    processes = length(Process.list())
    sockets = :socket.number_of()
    ports = length(:erlang.ports())

    1..1_000
    |> Task.async_stream(
      fn _ ->
        conn = connect!(port, active: false)
        :ok = Connection.close(conn)
      end,
      max_concurrency: 8,
      timeout: 30_000
    )
    |> Stream.run()

    eventually(
      fn -> match?({:ok, %{connections: 0, routes: 0}}, Listener.stats(listener)) end,
      15_000
    )

    eventually(fn -> length(Process.list()) <= processes end, 15_000)
    assert :socket.number_of() <= sockets
    assert length(:erlang.ports()) <= ports
    assert {:ok, %{accepted: 1_001}} = Listener.stats(listener)
    Listener.stop(listener)
  end

  defp flush_messages do
    receive do
      _ -> flush_messages()
    after
      0 -> :ok
    end
  end
end
