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
    # A socket is closed by the VM once its owner is gone, a moment after
    # the process itself.
    eventually(fn -> :socket.number_of() <= sockets end, 15_000)
    eventually(fn -> length(:erlang.ports()) <= ports end, 15_000)
    assert {:ok, %{accepted: 1_001}} = Listener.stats(listener)
    Listener.stop(listener)
  end

  # VM-wide, so here with the sync tests: no other test makes connections now.
  test "the NIF counts connection resources until the VM frees them" do
    # Once what earlier tests made is freed.
    %{native_connections: before} = Quichex.Test.Soak.idle_baseline()
    {:ok, config} = Quichex.Config.build(client_config(), :client)

    {pid, ref} =
      spawn_monitor(fn ->
        {:ok, _conn} =
          Quichex.Native.connection_connect(
            config,
            "localhost",
            :crypto.strong_rand_bytes(16),
            {{127, 0, 0, 1}, 40_000},
            {{127, 0, 0, 1}, 9},
            262_144,
            nil
          )

        assert Quichex.Native.connection_live_count() == before + 1
      end)

    assert_receive {:DOWN, ^ref, :process, ^pid, :normal}
    # Freed with the heap of the process that held it.
    eventually(fn -> Quichex.Native.connection_live_count() == before end, 5_000, 10)
  end

  defp flush_messages do
    receive do
      _ -> flush_messages()
    after
      0 -> :ok
    end
  end
end
