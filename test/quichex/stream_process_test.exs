defmodule Quichex.StreamProcessTest do
  # A stream process as an OTP citizen and as its owner sees it after
  # sending is over: system messages (:sys) work on it, stray messages do
  # not disturb it, and send/3 after our FIN or reset says why it refuses.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}

  setup do
    {listener, port} = start_listener()
    on_exit(fn -> Listener.stop(listener) end)
    conn = connect!(port)
    server = accept!(listener)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "hello")
    assert_receive {:quic_stream_opened, ^server, peer, :bidirectional}
    %{conn: conn, server: server, stream: stream, peer: peer}
  end

  # Sends `data` and collects the peer's (active) messages until it is there.
  defp echo(stream, peer, data) do
    :ok = Stream.send(stream, data)
    read_until(peer, data, "")
  end

  defp read_until(peer, data, acc) do
    if String.ends_with?(acc, data) do
      acc
    else
      assert_receive {:quic_stream, _conn, ^peer, chunk}, 5_000
      read_until(peer, data, acc <> chunk)
    end
  end

  test "answers :sys: get_state, replace_state, suspend and resume", ctx do
    state = :sys.get_state(ctx.stream)
    assert %{conn: conn, id: 0} = state
    assert conn == ctx.conn
    assert :sys.replace_state(ctx.stream, & &1) == state

    :ok = :sys.suspend(ctx.stream)
    :ok = :sys.resume(ctx.stream)
    assert echo(ctx.stream, ctx.peer, "after resume") =~ "after resume"
  end

  test ":sys.terminate/2 ends it like any exit: the owner's calls say :closed", ctx do
    ref = Process.monitor(ctx.stream)
    :ok = :sys.terminate(ctx.stream, :normal)
    assert_receive {:DOWN, ^ref, :process, _, :normal}
    assert {:error, :closed} = Stream.info(ctx.stream)
    assert {:ok, %{is_established: true}} = Connection.info(ctx.conn)
  end

  test "stray messages are ignored and the stream goes on", ctx do
    send(ctx.stream, {:not, :for, :a, :stream})
    send(ctx.stream, :hello)
    assert echo(ctx.stream, ctx.peer, "still here") =~ "still here"
  end

  test "setopts/2 without :active changes nothing", ctx do
    assert :ok = Stream.setopts(ctx.stream, [])
    # Still passive: a read with nothing there times out.
    assert {:error, :timeout} = Stream.recv(ctx.stream, timeout: 0)
  end

  test "send/3 after our FIN is {:error, :finished}; after our reset {:error, :closed}", ctx do
    :ok = Stream.send(ctx.stream, "last", fin: true)
    assert {:error, :finished} = Stream.send(ctx.stream, "more")

    {:ok, other} = Connection.open_stream(ctx.conn, :bidirectional, active: false)
    :ok = Stream.shutdown(other, :write, error_code: 3)
    assert {:error, :closed} = Stream.send(other, "more")
  end

  test "a Connection function given a stream answers :not_a_connection", ctx do
    assert {:error, :not_a_connection} = Connection.info(ctx.stream)
    assert {:ok, %{id: 0}} = Stream.info(ctx.stream)
  end
end
