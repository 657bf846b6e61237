defmodule Quichex.Soak.GarbageTest do
  # 1,000,000 garbage datagrams (short form: 30,000) at a listener: random
  # bytes, well-formed long-header Initials with random DCIDs and versions,
  # short-header packets with random DCIDs, from 16 source ports. The VM
  # and the listener survive (no socket process restarts), memory returns
  # to within 5 MB of its baseline, no source gets back more than 3x what
  # it sent, and a real client connects afterwards.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener}
  alias Quichex.Test.Soak

  @moduletag timeout: 300_000
  @loopback {127, 0, 0, 1}
  @sources 16
  @pool_size 1_048_576

  test "a listener survives a flood of garbage datagrams" do
    count = Soak.size(1_000_000, 30_000)
    {listener, port} = start_listener(handler: Soak.Echo)
    on_exit(fn -> Listener.stop(listener) end)
    %{sockets: socket_pids} = Listener.children(listener)

    # Warm up: one real connection, so what starts lazily exists already.
    conn = connect!(port)
    Soak.echo!(conn, "warm")
    :ok = Connection.close(conn)
    eventually(fn -> match?({:ok, %{connections: 0}}, Listener.stats(listener)) end, 5_000, 20)
    [template | _] = hd(first_flights(1, {@loopback, port}))

    base = Soak.idle_baseline()
    started = Soak.now_ms()

    # In a task, so the random pool and the counts go with it.
    result =
      Task.async(fn ->
        pool = :crypto.strong_rand_bytes(@pool_size)
        Soak.flood(listener, port, count, @sources, &garbage(&1, pool, template))
      end)
      |> Task.await(:infinity)

    back = Soak.assert_amplification!(result)
    {:ok, stats} = Listener.stats(listener)

    # Every kind was seen, none admitted; the short headers and the unknown
    # versions were answered (the 3x check above is not vacuous).
    assert back > 0
    assert %{accepted: 1, connections: 0, pending_handshakes: 0} = stats
    assert stats.invalid > 0 and stats.invalid_initial > 0 and stats.version_negotiation > 0
    assert stats.stateless_resets > 0
    assert Process.alive?(listener)
    assert %{sockets: ^socket_pids} = Listener.children(listener)

    after_ = Soak.back_to_baseline!(base, 5 * 1_048_576)
    Soak.report("#{count} garbage datagrams", started, base, after_)

    conn = connect!(port)
    Soak.echo!(conn, "after the flood")
    :ok = Connection.close(conn)
  end

  # Datagram i: random bytes, a long-header Initial, or a short-header
  # packet, in turn. Sub-binaries of the random pool keep it cheap.
  defp garbage(i, pool, template) do
    case rem(i, 3) do
      0 ->
        random(pool, :rand.uniform(1_400))

      1 ->
        <<first, _version::32, dcid_len, _dcid::binary-size(dcid_len), rest::binary>> = template
        len = :rand.uniform(21) - 1
        [first, <<version()::32, len>>, random(pool, len), rest]

      2 ->
        [
          <<0x40 + :rand.uniform(64) - 1>>,
          random(pool, 16),
          random(pool, 20 + :rand.uniform(1_180))
        ]
    end
  end

  # QUIC v1 (does not decrypt under a random DCID), v2, a draft, a
  # reserved greasing version, 0 (a Version Negotiation), or anything.
  defp version do
    case :rand.uniform(6) do
      1 -> 1
      2 -> 0x6B3343CF
      3 -> 0xFF00001D
      4 -> 0x1A2A3A4A
      5 -> 0
      6 -> :rand.uniform(0xFFFFFFFF)
    end
  end

  defp random(pool, len) do
    binary_part(pool, :rand.uniform(@pool_size - len + 1) - 1, len)
  end
end
