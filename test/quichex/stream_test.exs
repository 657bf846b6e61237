defmodule Quichex.StreamTest do
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}

  # A client connection and its server side, both owned by the test process.
  # Streams are passive here (recv/2-based tests): peer streams by the
  # listener's and the client's stream_opts, ours by open/2.
  defp pair(opts \\ []) do
    listener_opts =
      Keyword.merge([stream_opts: [active: false]], Keyword.get(opts, :listener, []))

    {listener, port} = start_listener(listener_opts)
    client_opts = Keyword.merge([stream_opts: [active: false]], Keyword.get(opts, :client, []))
    client = connect!(port, client_opts)
    server = accept!(listener)
    on_exit(fn -> Listener.stop(listener) end)
    {client, server}
  end

  defp open(conn, dir \\ :bidirectional, opts \\ []),
    do: Connection.open_stream(conn, dir, Keyword.put_new(opts, :active, false))

  defp opened!(conn, timeout \\ 5_000) do
    receive do
      {:quic_stream_opened, ^conn, stream, direction} -> {stream, direction}
    after
      timeout -> flunk("no stream opened")
    end
  end

  defp read_all(stream, acc \\ []) do
    case Stream.recv(stream, timeout: 10_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data])}
      {:ok, data, false} -> read_all(stream, [acc | data])
      error -> error
    end
  end

  # Reads with active mode `mode`; returns {:ok, data, fin?} when the stream
  # finishes or errors.
  defp read_active(stream, mode, acc \\ []) do
    case mode do
      false -> read_all(stream)
      _ -> active_loop(stream, mode, acc)
    end
  end

  defp active_loop(stream, mode, acc) do
    :ok = Stream.setopts(stream, active: mode)
    collect(stream, mode, acc)
  end

  defp collect(stream, mode, acc) do
    receive do
      {:quic_stream, _conn, ^stream, data} ->
        acc = [acc | data]
        if mode == :once, do: active_loop(stream, mode, acc), else: collect(stream, mode, acc)

      {:quic_stream_passive, _conn, ^stream} ->
        active_loop(stream, mode, acc)

      {:quic_stream_fin, _conn, ^stream} ->
        {:ok, IO.iodata_to_binary(acc)}

      {:quic_stream_reset, _conn, ^stream, code} ->
        {:error, {:reset, code}}
    after
      10_000 -> {:error, :timeout}
    end
  end

  describe "bidirectional" do
    test "send, FIN and recv in passive mode" do
      {client, server} = pair()
      {:ok, stream} = open(client)

      assert {:ok, %{id: 0, direction: :bidirectional, initiator: :local, connection: ^client}} =
               Stream.info(stream)

      :ok = Stream.send(stream, ["hello", ?\s, "world"])
      {peer, :bidirectional} = opened!(server)
      assert {:ok, %{id: 0, initiator: :remote, connection: ^server}} = Stream.info(peer)
      assert {:ok, "hello world", false} = Stream.recv(peer, length: 11)
      :ok = Stream.close(stream)
      assert {:ok, "", true} = Stream.recv(peer)
      assert {:error, :closed} = Stream.recv(peer, timeout: 100)

      :ok = Stream.send(peer, "reply", fin: true)
      assert {:ok, "reply", true} = Stream.recv(stream)
      # Both directions done: both stream processes end.
      eventually(fn -> not Process.alive?(stream) and not Process.alive?(peer) end)
    end

    test "recv with a length waits for exactly that many bytes" do
      {client, server} = pair()
      {:ok, stream} = open(client)
      :ok = Stream.send(stream, "abc")
      {peer, _} = opened!(server)
      task = Task.async(fn -> Stream.recv(peer, length: 6, timeout: 5_000) end)
      Process.sleep(50)
      :ok = Stream.send(stream, "defgh")
      assert {:ok, "abcdef", false} = Task.await(task)
      assert {:ok, "gh", false} = Stream.recv(peer, length: 0)
      assert {:error, :timeout} = Stream.recv(peer, timeout: 50)
    end

    test "active modes deliver messages; active: n ends with a passive notice" do
      {client, server} = pair()
      {:ok, stream} = open(client)
      :ok = Stream.send(stream, "one")
      {peer, _} = opened!(server)
      :ok = Stream.setopts(peer, active: 2)
      assert_receive {:quic_stream, ^server, ^peer, "one"}
      :ok = Stream.send(stream, "two")
      assert_receive {:quic_stream, ^server, ^peer, "two"}
      assert_receive {:quic_stream_passive, ^server, ^peer}
      :ok = Stream.send(stream, "three", fin: true)
      refute_receive {:quic_stream, ^server, ^peer, _}, 100
      :ok = Stream.setopts(peer, active: true)
      assert_receive {:quic_stream, ^server, ^peer, "three"}
      assert_receive {:quic_stream_fin, ^server, ^peer}
    end

    test "recv in active mode is an error" do
      {client, _server} = pair()
      {:ok, stream} = Connection.open_stream(client, :bidirectional, active: true)
      assert {:error, :active} = Stream.recv(stream)
    end

    test "100 MB on one stream arrives byte-exact" do
      {client, server} = pair()
      payload = :crypto.strong_rand_bytes(100 * 1024 * 1024)
      {:ok, stream} = open(client)
      sender = Task.async(fn -> Stream.send(stream, payload, fin: true, timeout: 60_000) end)
      {peer, _} = opened!(server)
      assert {:ok, received} = read_all(peer)
      assert byte_size(received) == byte_size(payload)
      assert received == payload
      assert :ok = Task.await(sender, 60_000)
    end

    test "1,000 concurrent streams on one connection" do
      {client, server} =
        pair(
          listener: [config_opts: [initial_max_streams_bidi: 1_000]],
          client: [config_opts: [initial_max_streams_bidi: 1_000]]
        )

      test = self()

      reader =
        spawn_link(fn ->
          results =
            for _ <- 1..1_000 do
              {peer, _} = opened!(server, 20_000)
              {:ok, data} = read_all(peer)
              data
            end

          send(test, {:read, results})
        end)

      :ok = Connection.controlling_process(server, reader)

      1..1_000
      |> Task.async_stream(
        fn i ->
          {:ok, stream} = open(client, :bidirectional, timeout: 20_000)
          :ok = Stream.send(stream, "stream #{i} " <> :binary.copy("x", 1_000), fin: true)
        end,
        max_concurrency: 1_000,
        timeout: 30_000
      )
      |> Enum.each(fn {:ok, :ok} -> :ok end)

      assert_receive {:read, results}, 30_000
      assert length(results) == 1_000

      ids =
        results
        |> Enum.map(fn "stream " <> rest -> rest |> String.split(" ") |> hd() end)
        |> Enum.sort()

      assert ids == Enum.sort(for i <- 1..1_000, do: Integer.to_string(i))
    end

    test "opening past the peer's stream limit waits for credit, then :stream_limit" do
      {client, server} = pair(listener: [config_opts: [initial_max_streams_bidi: 2]])
      {:ok, s1} = open(client)
      {:ok, _s2} = open(client)

      assert {:error, :stream_limit} = open(client, :bidirectional, timeout: 200)

      # Finishing a stream both ways gives credit back; the waiting open succeeds.
      waiter =
        Task.async(fn ->
          {:ok, s3} = open(client, :bidirectional, timeout: 5_000)
          Stream.info(s3)
        end)

      :ok = Stream.send(s1, "x", fin: true)
      {p1, _} = opened!(server)
      {:ok, "x"} = read_all(p1)
      :ok = Stream.send(p1, "y", fin: true)
      {:ok, "y"} = read_all(s1)
      assert {:ok, %{id: 8}} = Task.await(waiter, 6_000)
    end
  end

  defmodule Finisher do
    # Tells the test when each stream's FIN arrived.
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_fin(stream, %{test: test} = state) do
      {:ok, %{id: id}} = Quichex.Stream.info(stream)
      send(test, {:finished, id})
      {:close, state}
    end
  end

  describe "priorities (RFC 9218)" do
    test "of two streams competing, the urgent one completes first, though it started last" do
      # The connection's flow-control window is the bottleneck, so who gets
      # its credit first decides who finishes first.
      {listener, port} =
        start_listener(
          handler: Finisher,
          handler_options: %{test: self()},
          config_opts: [initial_max_data: 200_000, max_connection_window: 200_000]
        )

      on_exit(fn -> Listener.stop(listener) end)
      conn = connect!(port)
      payload = :crypto.strong_rand_bytes(8_000_000)

      {:ok, slow} = open(conn, :bidirectional, priority: [urgency: 7])
      {:ok, urgent} = open(conn, :bidirectional)
      :ok = Stream.set_priority(urgent, urgency: 0, incremental: false)
      {:ok, %{id: slow_id}} = Stream.info(slow)
      {:ok, %{id: urgent_id}} = Stream.info(urgent)

      senders =
        for stream <- [slow, urgent] do
          task = Task.async(fn -> Stream.send(stream, payload, fin: true, timeout: 30_000) end)
          # The slow stream gets a head start.
          Process.sleep(if stream == slow, do: 20, else: 0)
          task
        end

      assert_receive {:finished, first}, 30_000
      assert_receive {:finished, second}, 30_000
      assert {first, second} == {urgent_id, slow_id}
      assert [:ok, :ok] = Task.await_many(senders, 30_000)
    end

    test "bad priorities raise ArgumentError naming the option" do
      {client, _server} = pair()

      assert_raise ArgumentError, ~r/:urgency/, fn ->
        open(client, :bidirectional, priority: [urgency: 8])
      end

      assert_raise ArgumentError, ~r/:incremental/, fn ->
        open(client, :bidirectional, priority: [incremental: 1])
      end

      {:ok, stream} = open(client)
      assert_raise ArgumentError, ~r/:urgency/, fn -> Stream.set_priority(stream, urgency: -1) end
      assert_raise ArgumentError, fn -> Stream.set_priority(stream, bogus: 1) end
    end
  end

  describe "unidirectional" do
    test "both ways" do
      {client, server} = pair()
      {:ok, up} = open(client, :unidirectional)
      assert {:ok, %{id: 2, direction: :unidirectional}} = Stream.info(up)
      :ok = Stream.send(up, "to server", fin: true)
      {peer_up, :unidirectional} = opened!(server)
      assert {:ok, "to server"} = read_all(peer_up)
      assert {:error, :closed} = Stream.send(peer_up, "nope")

      {:ok, down} = open(server, :unidirectional)
      assert {:ok, %{id: 3}} = Stream.info(down)
      :ok = Stream.send(down, "to client", fin: true)
      {peer_down, :unidirectional} = opened!(client)
      assert {:ok, "to client"} = read_all(peer_down)
      assert {:error, :closed} = Stream.recv(down, timeout: 100)
      eventually(fn -> not Enum.any?([up, peer_up, down, peer_down], &Process.alive?/1) end)
    end
  end

  describe "resets and stop_sending" do
    test "the peer's RESET_STREAM code arrives as {:error, {:reset, code}} and as a message" do
      {client, server} = pair()
      {:ok, stream} = open(client)
      :ok = Stream.send(stream, "partial")
      {peer, _} = opened!(server)
      assert {:ok, "partial", false} = Stream.recv(peer)
      :ok = Stream.shutdown(stream, :write, error_code: 42)
      assert {:error, {:reset, 42}} = Stream.recv(peer)

      {:ok, stream2} = open(client)
      :ok = Stream.send(stream2, "x")
      {peer2, _} = opened!(server)
      :ok = Stream.setopts(peer2, active: true)
      assert_receive {:quic_stream, ^server, ^peer2, "x"}
      :ok = Stream.shutdown(stream2, :write, error_code: 7)
      assert_receive {:quic_stream_reset, ^server, ^peer2, 7}
    end

    test "the peer's STOP_SENDING code fails sends and arrives as a message" do
      {client, server} = pair()
      {:ok, stream} = Connection.open_stream(client, :bidirectional, active: true)
      :ok = Stream.send(stream, "hello")
      {peer, _} = opened!(server)
      {:ok, "hello", false} = Stream.recv(peer)
      :ok = Stream.send(peer, "back")
      assert_receive {:quic_stream, ^client, ^stream, "back"}

      :ok = Stream.shutdown(peer, :read, error_code: 99)
      assert_receive {:quic_stream_stopped, ^client, ^stream, 99}, 2_000
      assert {:error, {:stopped, 99}} = Stream.send(stream, "more")
    end
  end

  describe "stop_sending while blocked" do
    test "a send blocked by flow control returns {:stopped, code} promptly, also after the peer's FIN" do
      {client, server} = pair()
      {:ok, stream} = open(client)
      :ok = Stream.send(stream, "GET", fin: true)
      {peer, _} = opened!(server)
      assert {:ok, "GET"} = read_all(peer)

      # The server streams a response the client does not read: its sends
      # block on the client's 1 MB window.
      writer =
        Task.async(fn ->
          Enum.reduce_while(1..1_000, 0, fn _, n ->
            case Stream.send(peer, :binary.copy("x", 64_000), timeout: 10_000) do
              :ok -> {:cont, n + 1}
              error -> {:halt, {error, System.monotonic_time(:millisecond)}}
            end
          end)
        end)

      Process.sleep(300)
      stopped_at = System.monotonic_time(:millisecond)
      :ok = Stream.shutdown(stream, :read, error_code: 9)
      assert {{:error, {:stopped, 9}}, returned_at} = Task.await(writer, 15_000)
      assert returned_at - stopped_at < 2_000
      assert_receive {:quic_stream_stopped, ^server, ^peer, 9}
    end
  end

  describe "lifecycle" do
    test "owner death resets the stream with the documented code" do
      {client, server} = pair()
      test = self()

      owner =
        spawn(fn ->
          {:ok, stream} = open(client)
          :ok = Stream.send(stream, "data")
          send(test, {:stream, stream})
          Process.sleep(:infinity)
        end)

      assert_receive {:stream, stream}
      {peer, _} = opened!(server)
      {:ok, "data", false} = Stream.recv(peer)
      Process.exit(owner, :kill)
      assert {:error, {:reset, code}} = Stream.recv(peer, timeout: 2_000)
      assert code == Stream.owner_down_error_code()
      eventually(fn -> not Process.alive?(stream) end)
      {:ok, stats} = Connection.stats(client)
      assert stats.streams <= 1
    end

    test "connection close ends blocked sends and recvs with errors and no stream is left" do
      {client, server} =
        pair(listener: [config_opts: [initial_max_stream_data_bidi_remote: 10_000]])

      {:ok, sending} = open(client)
      {:ok, receiving} = open(client)
      :ok = Stream.send(receiving, "hi")
      # 1 MB cannot pass a 10 kB window the server never reads: send blocks.
      send_task =
        Task.async(fn -> Stream.send(sending, :binary.copy("z", 1_000_000), timeout: 10_000) end)

      recv_task = Task.async(fn -> Stream.recv(receiving, timeout: 10_000) end)
      Process.sleep(100)
      started = System.monotonic_time(:millisecond)
      :ok = Connection.close(client, error_code: 1)
      assert {:error, :closed} = Task.await(send_task)
      assert {:error, :closed} = Task.await(recv_task)
      assert System.monotonic_time(:millisecond) - started < 2_000
      assert_receive {:quic_stream_closed, ^client, ^sending, :local}
      eventually(fn -> not Process.alive?(sending) and not Process.alive?(receiving) end)
      assert_receive {:quic_connection_closed, ^server, 1, _}, 2_000
    end

    test "send times out under flow control, without losing the stream" do
      {client, _server} =
        pair(listener: [config_opts: [initial_max_stream_data_bidi_remote: 5_000]])

      {:ok, stream} = open(client)
      assert {:error, :timeout} = Stream.send(stream, :binary.copy("z", 2_000_000), timeout: 200)
      assert Process.alive?(stream)
    end
  end

  test "property: bytes arrive exactly once, in order, with FIN where sent" do
    sizes =
      :proper_types.frequency([
        {4, :proper_types.integer(1, 2_000)},
        {3, :proper_types.integer(1, 200_000)},
        {1, :proper_types.integer(1, 4_000_000)}
      ])

    stream_case =
      :proper_types.tuple([
        :proper_types.oneof([sizes, :proper_types.exactly(0)]),
        :proper_types.integer(1, 8),
        :proper_types.boolean(),
        :proper_types.elements([false, true, :once, 1, 3])
      ])

    gen = :proper_types.non_empty(:proper_types.resize(64, :proper_types.list(stream_case)))

    {client, server} =
      pair(
        listener: [config_opts: [initial_max_streams_bidi: 10_000]],
        client: [config_opts: [initial_max_streams_bidi: 10_000]]
      )

    property =
      forall(gen, fn cases ->
        cases = cases |> Enum.take(64) |> bound_volume(24_000_000)
        # An empty stream without FIN never reaches the peer: give it a FIN.
        cases = for {size, chunks, fin, mode} <- cases, do: {size, chunks, fin or size == 0, mode}

        streams =
          for {size, chunks, fin, mode} <- cases do
            {:ok, stream} = open(client, :bidirectional, timeout: 20_000)
            {:ok, %{id: id}} = Stream.info(stream)
            {id, stream, :crypto.strong_rand_bytes(size), chunks, fin, mode}
          end

        plan =
          Map.new(streams, fn {id, _, payload, _, fin, mode} ->
            {id, {byte_size(payload), fin, mode}}
          end)

        reader = start_reader(server, plan)

        senders =
          for {_id, stream, payload, chunks, fin, _mode} <- streams do
            Task.async(fn ->
              Enum.each(split(payload, chunks), &(:ok = Stream.send(stream, &1, timeout: 20_000)))
              if fin, do: :ok = Stream.close(stream)
            end)
          end

        Enum.each(senders, &Task.await(&1, 30_000))

        received =
          receive do
            {:received, ^reader, received} -> received
          after
            30_000 -> flunk("reader did not finish")
          end

        Enum.all?(streams, fn {id, _stream, payload, _chunks, _fin, _mode} ->
          Map.fetch!(received, id) == {:ok, payload}
        end)
      end)

    proper!(property, 12)
  end

  defp bound_volume(cases, limit) do
    {kept, _} =
      Enum.reduce(cases, {[], 0}, fn {size, _, _, _} = c, {acc, total} ->
        if total + size <= limit, do: {[c | acc], total + size}, else: {acc, total}
      end)

    Enum.reverse(kept)
  end

  # The server's controlling process: hands each peer stream to a task that
  # reads it in the planned mode, then reports every result.
  defp start_reader(server, plan) do
    test = self()

    reader =
      spawn_link(fn ->
        tasks =
          for _ <- 1..map_size(plan) do
            {peer, _} = opened!(server, 20_000)
            {:ok, %{id: id}} = Stream.info(peer)
            {size, fin, mode} = Map.fetch!(plan, id)

            task =
              Task.async(fn ->
                receive do
                  :go -> :ok
                end

                result = if fin, do: read_active(peer, mode), else: read_exact(peer, size)
                {id, result}
              end)

            :ok = Stream.controlling_process(peer, task.pid)
            send(task.pid, :go)
            task
          end

        received = Map.new(Task.await_many(tasks, 30_000))
        # Hand the connection back: its owner exiting would close it.
        :ok = Connection.controlling_process(server, test)
        send(test, {:received, self(), received})
      end)

    :ok = Connection.controlling_process(server, reader)
    reader
  end

  defp read_exact(peer, n) do
    case Stream.recv(peer, length: n, timeout: 10_000) do
      {:ok, data, false} -> {:ok, data}
      other -> other
    end
  end

  defp split(payload, chunks) when byte_size(payload) == 0 or chunks == 1,
    do: if(payload == "", do: [], else: [payload])

  defp split(payload, chunks) do
    size = max(div(byte_size(payload), chunks), 1)

    case payload do
      <<head::binary-size(size), rest::binary>> when rest != "" ->
        [head | split(rest, chunks - 1)]

      _ ->
        [payload]
    end
  end
end
