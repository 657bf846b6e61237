defmodule Quichex.MemoryTest do
  # Measures VM-wide memory (:erlang.memory/0): runs alone, after the async tests.
  use ExUnit.Case, async: false

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}

  defp pair(opts) do
    {listener, port} = start_listener(Keyword.get(opts, :listener, []))
    client = connect!(port)
    server = accept!(listener)
    on_exit(fn -> Listener.stop(listener) end)
    {client, server}
  end

  defp opened!(conn) do
    receive do
      {:quic_stream_opened, ^conn, stream, direction} -> {stream, direction}
    after
      5_000 -> flunk("no stream opened")
    end
  end

  test "a reader that never reads keeps memory bounded by the flow-control windows" do
    window = 256_000

    {client, server} =
      pair(
        listener: [
          stream_opts: [active: false],
          config_opts: [
            initial_max_stream_data_bidi_remote: window,
            initial_max_data: 4 * window,
            # No window auto-tuning: the windows stay as set.
            max_stream_window: window,
            max_connection_window: 4 * window
          ]
        ]
      )

    {:ok, stream} = Connection.open_stream(client, :bidirectional, active: false)
    :ok = Stream.send(stream, "x")
    {peer, _} = opened!(server)
    before = :erlang.memory(:total)
    chunk = :binary.copy("m", 64_000)

    # The peer never reads: sending stops at the window.
    result =
      Enum.reduce_while(1..200, 0, fn _, sent ->
        case Stream.send(stream, chunk, timeout: 200) do
          :ok -> {:cont, sent + byte_size(chunk)}
          {:error, :timeout} -> {:halt, sent}
        end
      end)

    # The peer's window, what its stream process read ahead, one chunk.
    assert result <= window + Quichex.Connection.Driver.window() + 64_000

    for pid <- [peer, server, client, stream] do
      {:memory, mem} = Process.info(pid, :memory)
      assert mem < 2 * window, "#{inspect(pid)} holds #{mem} bytes"
    end

    assert :erlang.memory(:total) - before < 8 * window
  end
end
