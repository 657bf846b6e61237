defmodule Quichex.Connection.Requests do
  @moduledoc false
  # What stream processes (and open_stream/3 callers) ask of the
  # connection: open a stream, send, give read credit back, shut a
  # direction down, change priority; and what their exits mean. Each
  # request changes the state; the next driver pass (Driver) carries it out.

  alias Quichex.Native
  alias Quichex.Connection.{Driver, Reports, State, Streams, WriteQueue}
  alias Quichex.Connection.WriteQueue.Write
  alias Quichex.Stream.Server, as: StreamServer

  @max_credit 0xFFFF_FFFF_FFFF_FFFF

  ## Stream processes

  @doc "Starts the process of a stream the peer opened."
  def start_peer_stream(data, id) do
    owner =
      case data.handler do
        {:handler, module, options} -> {:handler, module, options}
        _ -> {:owner, data.owner}
      end

    start_stream(data, id, owner, data.stream_active, :remote)
  end

  defp start_stream(data, id, owner, active, initiator, urgency \\ 3) do
    pid =
      StreamServer.start_link(%{
        conn: self(),
        id: id,
        owner: owner,
        active: active,
        initiator: initiator,
        direction: Streams.direction(id),
        readable: Streams.can_recv?(data.streams, id),
        writable: Streams.can_send?(data.streams, id),
        window: Driver.window()
      })

    %{data | streams: Streams.put(data.streams, id, pid, urgency)}
  end

  @doc "`{:ok, pids}` of the streams quiche would take data for now (see writable_streams/2)."
  def writable_streams(%State{} = data) do
    candidates =
      for {id, %{send: :open}} <- data.streams.by_id,
          not WriteQueue.pending?(data.writes, id),
          do: id

    {:ok, ids} = Native.connection_writable_streams(data.native, candidates)
    {:ok, Enum.map(ids, &Streams.pid(data.streams, &1))}
  end

  @doc "Gives the peer's streams that have no owner yet to `owner`."
  def adopt_streams(%State{} = data, owner) do
    for {id, %{pid: pid}} <- data.streams.by_id,
        not Streams.local?(data.streams, id),
        do: send(pid, {:quichex_adopt, owner})

    :ok
  end

  ## Opening our streams

  @doc "Opens one of our streams for `from`, or queues the call until the peer gives credit."
  def open_stream(%State{} = data, from, request) do
    kind = request.kind
    id = Streams.next_id(data.streams, kind)

    case Native.connection_stream_open(data.native, id, request.urgency, request.incremental) do
      :ok ->
        active = if request.active == nil, do: data.active, else: request.active
        data = start_stream(data, id, {:owner, request.owner}, active, :local, request.urgency)
        :gen_statem.reply(from, {:ok, Streams.pid(data.streams, id)})
        %{data | streams: Streams.advance(data.streams, kind)}

      {:error, :stream_limit} ->
        if expired?(request.deadline) do
          :gen_statem.reply(from, {:error, :stream_limit})
          data
        else
          %{data | streams: Streams.add_waiter(data.streams, from, request)}
        end

      {:error, reason} ->
        :gen_statem.reply(from, {:error, Reports.transport_error(reason)})
        data
    end
  end

  defp expired?(:infinity), do: false
  defp expired?(deadline), do: System.monotonic_time(:millisecond) >= deadline

  @doc "Retries waiting open_stream/3 calls the peer now has credit for, in order."
  def retry_waiters(%State{streams: %Streams{waiters: []}} = data), do: data

  def retry_waiters(%State{} = data) do
    {waiters, streams} = Streams.take_waiters(data.streams)

    Enum.reduce(waiters, %{data | streams: streams}, fn waiter, acc ->
      if Streams.credit?(acc.streams, waiter.request.kind) do
        open_stream(acc, waiter.from, waiter.request)
      else
        %{acc | streams: Streams.add_waiter(acc.streams, waiter.from, waiter.request)}
      end
    end)
  end

  @doc "Answers `{:error, :stream_limit}` to waiters whose deadline passed."
  def expire_waiters(%State{} = data) do
    {expired, streams} = Streams.expire_waiters(data.streams, System.monotonic_time(:millisecond))
    Enum.each(expired, &:gen_statem.reply(&1.from, {:error, :stream_limit}))
    %{data | streams: streams}
  end

  ## Messages from stream processes

  @doc """
  A stream process's request: `{:send, id, from, data, fin, timeout}`,
  `{:credit, id, bytes}` or `{:shutdown, id, directions, code}`.
  """
  def stream_message(%State{} = data, {:send, id, from, bin, fin, timeout}) do
    case Streams.fetch(data.streams, id) do
      {:ok, %{send: :open}} ->
        write = %Write{
          ref: make_ref(),
          from: from,
          data: bin,
          fin: fin,
          deadline: deadline(timeout)
        }

        %{data | writes: WriteQueue.push(data.writes, id, write)}

      {:ok, %{send: closed}} ->
        GenServer.reply(from, {:error, send_error(closed)})
        data

      :error ->
        GenServer.reply(from, {:error, :closed})
        data
    end
  end

  # Credit saturates at what the NIF takes (a u64, added saturating there
  # too): a recv/2 may wait for any length.
  def stream_message(%State{} = data, {:credit, id, bytes}) when bytes > 0 do
    credit = min(Map.get(data.credits, id, 0) + bytes, @max_credit)
    %{data | credits: Map.put(data.credits, id, credit)}
  end

  def stream_message(%State{} = data, {:shutdown, id, directions, code}) do
    Enum.reduce(directions, data, fn
      :read, acc ->
        Driver.command(acc, id, :read, code)

      :write, acc ->
        case Streams.fetch(acc.streams, id) do
          {:ok, %{send: :open}} ->
            acc = Driver.fail_writes(acc, id, {:error, :closed})
            acc = %{acc | streams: Streams.set_send(acc.streams, id, :reset)}
            Driver.command(acc, id, :write, code)

          _ ->
            acc
        end
    end)
  end

  def stream_message(%State{} = data, {:priority, id, urgency, incremental}) do
    _ = Native.connection_stream_priority(data.native, id, urgency, incremental)
    %{data | streams: Streams.set_urgency(data.streams, id, urgency)}
  end

  def stream_message(%State{} = data, _unknown), do: data

  defp send_error(:fin), do: :finished
  defp send_error({:stopped, code}), do: {:stopped, code}
  defp send_error(_closed), do: :closed

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  @doc """
  A stream process ended. A normal exit means both directions finished; any
  other aborts what is still open: RESET_STREAM unless our FIN was
  accepted, STOP_SENDING unless the peer finished, with the code the exit
  names (`{:shutdown, {:abort, code}}`) or the owner-down code.
  """
  def stream_exit(%State{} = data, pid, reason) do
    case Streams.id_of(data.streams, pid) do
      :error ->
        :unknown

      {:ok, id} ->
        {entry, streams} = Streams.delete(data.streams, id)
        data = %{data | streams: streams}
        code = abort_code(reason)
        data = Driver.fail_writes(data, id, {:error, :closed})

        data =
          if entry.send == :open and reason != :normal,
            do: Driver.command(data, id, :write, code),
            else: data

        {:ok, Driver.command(data, id, :detach, code)}
    end
  end

  defp abort_code(:normal), do: 0
  defp abort_code({:shutdown, {:abort, code}}), do: code
  defp abort_code(_crash), do: Quichex.Stream.owner_down_error_code()
end
