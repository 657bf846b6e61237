defmodule Quichex.Connection.Driver do
  @moduledoc false
  # One driver pass, in the spirit of quinn's ConnectionDriver:
  #
  #   poll/3      feed the input (datagrams, the timer, read credit and
  #               stream commands) to quiche and learn what changed
  #   dispatch/2  hand stream data, resets and STOP_SENDING to the stream
  #               processes (starting one for each new peer stream), give
  #               waiting open_stream/3 calls the peer's new credit
  #   flush/1     write pending stream data and send every packet quiche has
  #               in GSO batches; returns quiche's next timer
  #
  # `Quichex.Connection.Transitions.drive/6` runs them in that order for every event and
  # moves between states in between. What stream processes ask of the
  # connection is in `Quichex.Connection.Requests`.

  alias Quichex.{Call, Native}
  alias Quichex.Connection.{Datagrams, Mobility, Paths, Reports, Requests, State, Streams, UDP}
  alias Quichex.Connection.WriteQueue
  alias Quichex.Connection.WriteQueue.Write

  # Packets per connection_flush call (a full GSO batch): well under a
  # millisecond of NIF work.
  @send_budget 64
  # Bytes a stream process may hold that its owner has not taken yet
  # (the read-ahead credit of each stream).
  @window 262_144

  def window, do: @window

  ## Input

  @doc """
  Runs the NIF poll with `packets` (`[{from, data, segment_size}]`), the
  timer flag, and the credit and commands gathered from stream processes.
  Returns `{poll, data}`.
  """
  def poll(%State{} = data, packets, timer?, to \\ nil) do
    commands = Enum.reverse(data.commands)
    credits = Map.to_list(data.credits)
    {:ok, poll} = Native.connection_poll(data.native, packets, to, timer?, credits, commands)
    data = %{data | credits: %{}, commands: [], repoll: poll.more}
    data = if packets != [], do: %{data | writes: WriteQueue.unblock(data.writes)}, else: data
    # The read budget ran out: poll again once the events queued meanwhile
    # were handled.
    data = if poll.more, do: schedule_pass(data), else: data
    {poll, data}
  end

  @doc "Whether a poll has input to give (otherwise a pass only flushes)."
  def poll_needed?(%State{credits: credits, commands: commands, repoll: repoll}),
    do: repoll or map_size(credits) > 0 or commands != []

  @doc "Makes sure a `:quichex_pass` message is on its way (batches stream messages)."
  def schedule_pass(%State{pass_pending: true} = data), do: data

  def schedule_pass(%State{} = data) do
    send(self(), :quichex_pass)
    %{data | pass_pending: true}
  end

  ## Dispatch

  @doc "Hands what a poll reported to the stream processes."
  def dispatch(%State{} = data, poll) do
    data = report(data, poll)
    data = %{data | in_early_data: poll.in_early_data}
    data = Mobility.path_events(data, poll.path_events)
    data = Mobility.retired(data, poll.retired_cids)
    data = if poll.established, do: Mobility.refill_cids(data, poll.scids_left), else: data
    data = Mobility.retry_probes(data, poll.dcids_left)
    data = session(data, poll.session)

    data = %{
      data
      | dgrams:
          Datagrams.arrived(
            data.dgrams,
            poll.dgrams,
            data.owner,
            data.active,
            poll.dgrams_dropped
          )
    }

    data = %{
      data
      | streams:
          Streams.put_credit(
            data.streams,
            poll.peer_streams_left_bidi,
            poll.peer_streams_left_uni
          )
    }

    # STOP_SENDING first: it is about our sending side, and a stream whose
    # receiving side ends in this pass must still hear of it.
    data = Enum.reduce(poll.stopped, data, fn {id, code}, acc -> stopped(acc, id, code) end)

    data =
      Enum.reduce(poll.reads, data, fn
        {id, {:reset, code}}, acc -> to_stream(acc, id, {:quic_reset, code})
        {id, {:error, reason}}, acc -> to_stream(acc, id, {:quic_error, reason})
        {id, bin, fin}, acc -> to_stream(acc, id, {:quic_data, bin, fin})
      end)

    Requests.retry_waiters(data)
  end

  # A new session ticket (a client's, for resumption): kept for session/1
  # and told to the owner.
  defp session(data, nil), do: data

  defp session(data, ticket) do
    Reports.notify_owner(data, {:quic_session_ticket, self(), ticket})
    %{data | session: ticket}
  end

  # Telemetry for what the poll counted: new losses, a log that failed.
  defp report(data, poll) do
    if poll.packets_lost > data.packets_lost do
      Reports.event(data, :packets_lost, %{
        count: poll.packets_lost - data.packets_lost,
        total: poll.packets_lost
      })
    end

    if poll.log_failure, do: Reports.event(data, :log_failed, %{}, %{reason: poll.log_failure})
    %{data | packets_lost: max(poll.packets_lost, data.packets_lost)}
  end

  # Sends `msg` to the stream's process, starting one for a new peer stream.
  defp to_stream(data, id, msg) do
    case Streams.pid(data.streams, id) do
      nil ->
        if Streams.local?(data.streams, id) do
          data
        else
          data = Requests.start_peer_stream(data, id)
          to_stream(data, id, msg)
        end

      pid ->
        send(pid, msg)
        data
    end
  end

  defp stopped(data, id, code) do
    data = to_stream(data, id, {:quic_stopped, code})
    data = %{data | streams: Streams.set_send(data.streams, id, {:stopped, code})}
    fail_writes(data, id, {:error, {:stopped, code}})
  end

  ## Writes

  @doc false
  def command(data, id, direction, code),
    do: %{data | commands: [{id, direction, code} | data.commands]}

  @doc "Fails every queued write of stream `id` with `result`."
  def fail_writes(%State{} = data, id, result) do
    {writes, queue} = WriteQueue.remove(data.writes, id)
    Enum.each(writes, &finish_write(data, id, &1, result))
    %{data | writes: queue}
  end

  @doc "A write's deadline passed: answer `{:error, :timeout}`; the stream stays usable."
  def expire_write(%State{} = data, id, ref) do
    case WriteQueue.expire(data.writes, id, ref) do
      {nil, _} ->
        data

      {write, queue} ->
        GenServer.reply(write.from, {:error, :timeout})
        %{data | writes: queue}
    end
  end

  # Answers the caller blocked in Stream.send/3, then (for a FIN) tells the
  # stream process its sending side is done. In this order the reply is in
  # the caller's mailbox before the stream can finish and exit.
  defp finish_write(data, id, %Write{} = write, result) do
    Call.cancel_timer(write.timer)
    GenServer.reply(write.from, result)

    if result == :ok and write.fin do
      case Streams.pid(data.streams, id) do
        nil -> :ok
        pid -> send(pid, {:quic_send_done, :fin})
      end
    end

    :ok
  end

  ## Output

  @doc """
  Writes pending stream data and sends everything quiche has, in GSO
  batches. Returns `{data, %{timeout: ms | nil, closed: boolean}}`.
  """
  def flush(%State{} = data) do
    # By urgency; streams of equal urgency in a fresh order each pass.
    salt = :erlang.unique_integer()
    rank = &{Streams.urgency(data.streams, &1), :erlang.phash2({&1, salt})}
    {writes, keys} = WriteQueue.batch(data.writes, rank)
    {dgrams, dgram_state} = Datagrams.take_out(data.dgrams)
    {:ok, out} = Native.connection_flush(data.native, writes, dgrams, @send_budget)
    data = %{data | in_early_data: out.in_early_data}
    data = dropped_event(%{data | dgrams: Datagrams.flushed(dgram_state, out, length(dgrams))})
    data = apply_writes(data, keys, out.writes)
    data = send_batches(data, out.batches)

    if out.more and not out.closed do
      flush_more(data)
    else
      flushed(data, out)
    end
  end

  # More packets than one call's budget: keep sending, without re-offering
  # the writes.
  defp flush_more(data) do
    {:ok, out} = Native.connection_flush(data.native, [], [], @send_budget)
    data = %{data | dgrams: Datagrams.flushed(data.dgrams, out)}
    data = send_batches(data, out.batches)

    if out.more and not out.closed,
      do: flush_more(data),
      else: flushed(data, out)
  end

  defp flushed(data, out) do
    {arm_write_timers(data), %{timeout: out.timeout, closed: out.closed, pace: pace_ms(data)}}
  end

  # One telemetry event per pass that dropped datagrams.
  defp dropped_event(data) do
    {count, dgrams} = Datagrams.take_dropped(data.dgrams)
    if count > 0, do: Reports.event(data, :datagrams_dropped, %{count: count})
    %{data | dgrams: dgrams}
  end

  defp apply_writes(data, [], _results), do: data

  defp apply_writes(data, keys, results) do
    {queue, ended} = WriteQueue.apply_results(data.writes, keys, results)
    data = %{data | writes: queue}

    Enum.reduce(ended, data, fn {id, write, result}, acc ->
      acc =
        case result do
          :ok when write.fin ->
            %{acc | streams: Streams.set_send(acc.streams, id, :fin)}

          {:error, {:stopped, code}} ->
            %{acc | streams: Streams.set_send(acc.streams, id, {:stopped, code})}

          _ ->
            acc
        end

      finish_write(acc, id, write, result)
      acc
    end)
  end

  # A write that waits gets a timer for its caller's timeout (a write that
  # went through at once never needs one).
  defp arm_write_timers(data) do
    Enum.reduce(WriteQueue.untimed(data.writes), data, fn {id, write}, acc ->
      ms = max(write.deadline - System.monotonic_time(:millisecond), 0)
      timer = :erlang.start_timer(ms, self(), {:write_timeout, id, write.ref})
      %{acc | writes: WriteQueue.put_timer(acc.writes, id, write.ref, timer)}
    end)
  end

  ## Pacing: a batch quiche wants sent later waits in `data.paced` (and so
  ## does every batch after it, to keep their order), released by one timer.

  # Batches due within this many µs go now.
  @pace_slack_us 500

  defp send_batches(data, []), do: data

  defp send_batches(data, [{_from, _to, _bin, _seg, delay} = batch | rest]) do
    if delay <= @pace_slack_us and :queue.is_empty(data.paced) do
      send_batches(send_batch(data, batch), rest)
    else
      due = System.monotonic_time(:microsecond) + delay
      paced = :queue.in({due, batch}, data.paced)
      send_batches(%{data | paced: paced, paced_count: data.paced_count + 1}, rest)
    end
  end

  @doc "Sends the paced batches that are due; `all?` sends every one (closing)."
  def release_paced(%State{} = data, all? \\ false) do
    now = System.monotonic_time(:microsecond)

    case :queue.out(data.paced) do
      {{:value, {due, batch}}, rest} when all? or due <= now + @pace_slack_us ->
        release_paced(send_batch(%{data | paced: rest}, batch), all?)

      _ ->
        data
    end
  end

  @doc "Milliseconds until the next paced batch is due, or nil."
  def pace_ms(%State{paced: paced}) do
    case :queue.peek(paced) do
      {:value, {due, _batch}} ->
        max(0, div(due - System.monotonic_time(:microsecond) + 999, 1_000))

      :empty ->
        nil
    end
  end

  defp send_batch(data, {from, to, bin, seg, _delay}) do
    send_batch(data, from, to, bin, seg)
  end

  defp send_batch(data, from, to, bin, seg) do
    # A client's packets for a probed or migrated path leave from that
    # path's socket.
    socket = Paths.socket(data.paths, from) || data.socket

    case UDP.send_batch(socket, to, bin, seg, data.gso) do
      :ok ->
        data

      {:ok, :gso_off} ->
        %{data | gso: false}

      # The listener socket we sent on is gone (its process is restarting):
      # another of the listener's sockets has the same address.
      {:error, :closed} when socket == data.socket and data.listener != nil ->
        case Quichex.Listener.Registry.any_socket(data.listener.shared) do
          nil -> data
          other when other == socket -> data
          other -> send_batch(%{data | socket: other}, from, to, bin, seg)
        end

      # A send error is a lost datagram to QUIC; recovery retransmits.
      {:error, _reason} ->
        data
    end
  end

  ## The end

  @doc """
  The connection is ending with `reason`: every queued write and waiting
  open_stream/3 gets `{:error, :closed}`, every stream process is told.
  """
  def end_streams(%State{} = data, reason) do
    {writes, queue} = WriteQueue.drain(data.writes)
    Enum.each(writes, fn {id, write} -> finish_write(data, id, write, {:error, :closed}) end)
    {waiters, streams} = Streams.take_waiters(data.streams)
    Enum.each(waiters, &:gen_statem.reply(&1.from, {:error, :closed}))
    Enum.each(Streams.pids(streams), &send(&1, {:quic_conn_closed, reason}))

    %{
      data
      | writes: queue,
        streams: streams,
        dgrams: data.dgrams |> Datagrams.withdraw() |> Datagrams.close(),
        paths: Paths.fail_waiters(data.paths, {:error, :closed})
    }
  end
end
