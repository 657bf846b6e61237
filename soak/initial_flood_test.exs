defmodule Quichex.Soak.InitialFloodTest do
  # 20,000 valid client Initials (short form: 1,000) from 32 source ports
  # that never answer, as from spoofed addresses. With Retry always on, no
  # connection state exists before validation: no connection process, no
  # native connection. With Retry off, max_connections bounds the
  # connection processes and the handshake timeout reclaims them. Either
  # way no source gets back more than 3x what it sent.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}
  alias Quichex.Test.Soak

  @moduletag timeout: 300_000
  @loopback {127, 0, 0, 1}
  @sources 32

  defp listener!(opts) do
    {listener, port} = start_listener([handler: Soak.Echo] ++ opts)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  # Samples `fun` until told to stop; returns the largest value seen.
  defp watch(fun) do
    Task.async(fn -> watch_loop(fun, fun.()) end)
  end

  defp watch_loop(fun, most) do
    receive do
      {:stop, from} -> send(from, {:most, most})
    after
      2 -> watch_loop(fun, max(most, fun.()))
    end
  end

  defp most(watcher) do
    send(watcher.pid, {:stop, self()})
    assert_receive {:most, most}, 5_000
    Task.shutdown(watcher)
    most
  end

  defp flood(listener, port, flights) do
    flights = flights |> Enum.map(&hd/1) |> List.to_tuple()

    Soak.flood(listener, port, tuple_size(flights), @sources, fn i ->
      elem(flights, i - 1)
    end)
  end

  test "Retry on: spoofed Initials create no connection state before validation" do
    count = Soak.size(20_000, 1_000)
    {listener, port} = listener!(retry: :always)
    %{connections: sup} = Listener.children(listener)
    # Before the flights are made: they are garbage once sent.
    base = Soak.idle_baseline()
    flights = first_flights(count, {@loopback, port})
    started = Soak.now_ms()

    watcher =
      watch(fn ->
        {:ok, stats} = Listener.stats(listener)

        Enum.max([
          DynamicSupervisor.count_children(sup).active,
          stats.pending_handshakes,
          Quichex.Native.connection_live_count() - base.native_connections
        ])
      end)

    result = flood(listener, port, flights)
    assert most(watcher) == 0
    Soak.assert_amplification!(result)

    # Each got a Retry, and every source got its Retries.
    assert {:ok, %{retry_sent: ^count, accepted: 0, refused: 0}} = Listener.stats(listener)
    assert map_size(result.received) == @sources

    after_ = Soak.back_to_baseline!(base, 5 * 1_048_576)
    Soak.report("#{count} spoofed Initials, Retry on", started, base, after_)

    # A real client answers its Retry and connects.
    conn = connect!(port)
    Soak.echo!(conn, "validated")
    :ok = Connection.close(conn)
    assert {:ok, %{retry_validated: 1}} = Listener.stats(listener)
  end

  test "Retry off: max_connections bounds the processes, the handshake timeout reclaims them" do
    count = Soak.size(20_000, 1_000)
    max = Soak.size(200, 50)
    handshake_timeout = 1_000

    {listener, port} =
      listener!(
        retry: :never,
        max_connections: max,
        max_pending_handshakes: count,
        handshake_timeout: handshake_timeout
      )

    %{connections: sup} = Listener.children(listener)
    # Before the flights are made: they are garbage once sent.
    base = Soak.idle_baseline()
    flights = first_flights(count, {@loopback, port})
    started = Soak.now_ms()
    watcher = watch(fn -> DynamicSupervisor.count_children(sup).active end)
    result = flood(listener, port, flights)
    flood_done = Soak.now_ms()
    most = most(watcher)

    # The cap was reached and held.
    assert most == max
    {:ok, stats} = Listener.stats(listener)
    assert stats.refused > 0
    assert stats.accepted + stats.refused == count
    # The half-open connections sent their first flights: at most 3x.
    assert Soak.assert_amplification!(result) > 0

    # Reclaimed by the handshake timeout, not by the listener going.
    eventually(
      fn -> DynamicSupervisor.count_children(sup).active == 0 end,
      handshake_timeout + 10_000,
      20
    )

    reclaimed_ms = Soak.now_ms() - flood_done
    assert {:ok, %{connections: 0, pending_handshakes: 0, routes: 0}} = Listener.stats(listener)
    after_ = Soak.back_to_baseline!(base, 5 * 1_048_576)

    Soak.report(
      "#{count} spoofed Initials, Retry off, max_connections #{max} " <>
        "(#{stats.accepted} accepted, all reclaimed #{reclaimed_ms} ms after the flood)",
      started,
      base,
      after_
    )

    conn = connect!(port)
    Soak.echo!(conn, "still serving")
    :ok = Connection.close(conn)
  end
end
