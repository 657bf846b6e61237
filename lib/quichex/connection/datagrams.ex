defmodule Quichex.Connection.Datagrams do
  @moduledoc false
  # DATAGRAM frames (RFC 9221) on one connection.
  #
  # Sending: once the handshake tells what the peer accepts, the connection
  # publishes it in an :atomics array, found through a public ETS table by
  # the connection's pid: the largest payload, and the room left in the send
  # queue. dgram_send/3 checks both in the caller and takes room atomically,
  # then casts the payload: no round trip per datagram, and datagrams sent
  # while a driver pass runs leave together in the next one. The connection
  # queues them here; the next flush hands them all to quiche in one NIF call,
  # so they share GSO batches with stream data; room comes back as quiche
  # sends them. What waits here plus what quiche holds never exceeds the
  # configured send queue length.
  #
  # Receiving: each poll takes every received payload out of quiche. In
  # active mode they go to the owner as {:quic_dgram, conn, data}, in order;
  # in passive mode they wait here for dgram_recv/2, at most the configured
  # receive queue length (the oldest is dropped first, as quiche does).

  alias Quichex.Call

  defstruct enabled: false,
            send_limit: 1000,
            recv_limit: 1000,
            out: [],
            out_count: 0,
            # from the last flush: the largest payload the peer takes now
            # (nil: not negotiated) and what quiche holds in its send queue
            max: nil,
            quiche_queued: 0,
            in: :queue.new(),
            in_count: 0,
            waiters: [],
            dropped_recv: 0,
            dropped_send: 0,
            quiche_dropped: 0,
            # drops already told to telemetry
            dropped_reported: 0,
            # the :atomics published for dgram_send/3 (see above)
            handle: nil

  @type t :: %__MODULE__{}

  def new(opts) do
    %__MODULE__{
      enabled: Keyword.get(opts, :enabled, false),
      send_limit: Keyword.get(opts, :send_queue_len, 1000),
      recv_limit: Keyword.get(opts, :recv_queue_len, 1000)
    }
  end

  ## The table of published handles

  @table __MODULE__
  # :atomics slots: largest payload (0: not negotiated), room left in the
  # send queue, sends refused for a full queue.
  @max_slot 1
  @room_slot 2
  @refused_slot 3

  @doc false
  @spec create_table() :: :ok
  def create_table do
    @table = :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    :ok
  end

  @doc "Publishes the handle once the handshake is done (datagrams enabled only)."
  def publish(%__MODULE__{enabled: true, handle: nil} = d) do
    ref = :atomics.new(3, signed: true)
    :atomics.put(ref, @max_slot, d.max || 0)
    :atomics.put(ref, @room_slot, d.send_limit - d.quiche_queued - d.out_count)
    :ets.insert(@table, {self(), ref})
    %{d | handle: ref}
  end

  def publish(d), do: d

  @doc "Withdraws the handle (the connection is ending)."
  def withdraw(%__MODULE__{handle: nil} = d), do: d

  def withdraw(d) do
    :ets.delete(@table, self())
    %{d | handle: nil}
  end

  @doc """
  dgram_send/3 in the caller: `:ok` once the payload is on its way,
  `{:error, reason}`, or `:call` when only the connection can answer (no
  handle: the handshake is running, datagrams are disabled, or the
  connection is gone).
  """
  def fast_send(conn, bin) do
    case :ets.lookup(@table, conn) do
      [{^conn, ref}] ->
        with :ok <- take_room(ref, bin), do: :gen_statem.cast(conn, {:dgram, bin})

      [] ->
        :call
    end
  end

  defp take_room(ref, bin) do
    max = :atomics.get(ref, @max_slot)

    cond do
      max == 0 ->
        {:error, :not_negotiated}

      byte_size(bin) > max ->
        {:error, {:too_big, max}}

      :atomics.sub_get(ref, @room_slot, 1) < 0 ->
        :atomics.add(ref, @room_slot, 1)
        :atomics.add(ref, @refused_slot, 1)
        {:error, :queue_full}

      true ->
        :ok
    end
  end

  @doc "A payload dgram_send/3 checked and cast (its room is taken)."
  def queue(d, bin), do: %{d | out: [bin | d.out], out_count: d.out_count + 1}

  ## Sending

  @doc "Queues `bin` for the next flush, or says why not."
  def send(%__MODULE__{enabled: false} = d, _bin), do: {:error, :disabled, d}
  def send(%__MODULE__{max: nil} = d, _bin), do: {:error, :not_negotiated, d}

  # Published: the same checks as in callers, on the same atomics.
  def send(%__MODULE__{handle: ref} = d, bin) when ref != nil do
    case take_room(ref, bin) do
      :ok -> {:ok, queue(d, bin)}
      {:error, reason} -> {:error, reason, d}
    end
  end

  def send(d, bin) do
    cond do
      byte_size(bin) > d.max ->
        {:error, {:too_big, d.max}, d}

      d.out_count + d.quiche_queued >= d.send_limit ->
        {:error, :queue_full, %{d | dropped_send: d.dropped_send + 1}}

      true ->
        {:ok, %{d | out: [bin | d.out], out_count: d.out_count + 1}}
    end
  end

  @doc "The payloads to hand quiche now, oldest first."
  def take_out(%__MODULE__{out_count: 0} = d), do: {[], d}
  def take_out(d), do: {Enum.reverse(d.out), %{d | out: [], out_count: 0}}

  @doc "What a flush reported, after `handed` payloads were given to quiche."
  def flushed(d, out, handed \\ 0) do
    # Payloads quiche sent or refused since the last flush give their room back.
    released = d.quiche_queued + handed - out.dgram_queued

    if d.handle do
      :atomics.put(d.handle, @max_slot, out.dgram_max || 0)
      if released > 0, do: :atomics.add(d.handle, @room_slot, released)
    end

    %{
      d
      | max: out.dgram_max,
        quiche_queued: out.dgram_queued,
        dropped_send: d.dropped_send + out.dgrams_refused
    }
  end

  def max_size(%__MODULE__{enabled: false}), do: {:error, :disabled}
  def max_size(%__MODULE__{max: nil}), do: {:error, :not_negotiated}
  def max_size(d), do: {:ok, d.max}

  ## Receiving

  @doc """
  Payloads a poll took out of quiche: to `owner` as messages when
  `active?`, else queued for dgram_recv/2. `quiche_dropped` is quiche's
  running count of payloads its full queue dropped.
  """
  def arrived(d, [], _owner, _active?, quiche_dropped),
    do: %{d | quiche_dropped: quiche_dropped}

  def arrived(d, dgrams, owner, true, quiche_dropped) do
    d = %{d | quiche_dropped: quiche_dropped}

    if is_pid(owner) do
      Enum.each(dgrams, &Kernel.send(owner, {:quic_dgram, self(), &1}))
      d
    else
      # Nobody to tell (a handler connection before its handshake).
      %{d | dropped_recv: d.dropped_recv + length(dgrams)}
    end
  end

  def arrived(d, dgrams, _owner, false, quiche_dropped) do
    d = Enum.reduce(dgrams, %{d | quiche_dropped: quiche_dropped}, &enqueue(&2, &1))
    serve(d)
  end

  defp enqueue(%{in_count: n, recv_limit: limit} = d, bin) when n >= limit do
    {_, queue} = :queue.out(d.in)
    %{d | in: :queue.in(bin, queue), dropped_recv: d.dropped_recv + 1}
  end

  defp enqueue(d, bin), do: %{d | in: :queue.in(bin, d.in), in_count: d.in_count + 1}

  # Answers waiting dgram_recv/2 callers, oldest first.
  defp serve(%{waiters: []} = d), do: d
  defp serve(%{in_count: 0} = d), do: d

  defp serve(%{waiters: [{from, _ref, timer} | rest]} = d) do
    Call.cancel_timer(timer)
    {{:value, bin}, queue} = :queue.out(d.in)
    :gen_statem.reply(from, {:ok, bin})
    serve(%{d | waiters: rest, in: queue, in_count: d.in_count - 1})
  end

  @doc "A dgram_recv/2 call: answered now, or waiting up to `timeout` ms."
  def recv(d, from, timeout) do
    case :queue.out(d.in) do
      {{:value, bin}, queue} when d.waiters == [] ->
        {:reply, {:ok, bin}, %{d | in: queue, in_count: d.in_count - 1}}

      _ ->
        ref = make_ref()

        timer =
          if timeout != :infinity,
            do: Process.send_after(self(), {:quichex_dgram_timeout, ref}, timeout)

        {:wait, %{d | waiters: d.waiters ++ [{from, ref, timer}]}}
    end
  end

  @doc "A waiting dgram_recv/2 timed out."
  def expire(d, ref) do
    case Enum.split_with(d.waiters, fn {_, r, _} -> r == ref end) do
      {[{from, _, _}], rest} ->
        :gen_statem.reply(from, {:error, :timeout})
        %{d | waiters: rest}

      _ ->
        d
    end
  end

  @doc "The connection is ending: waiting callers get `{:error, :closed}`."
  def close(d) do
    Enum.each(d.waiters, fn {from, _, timer} ->
      Call.cancel_timer(timer)
      :gen_statem.reply(from, {:error, :closed})
    end)

    %{d | waiters: []}
  end

  @doc "Payloads dropped since the last call: `{count, d}` (for the datagrams_dropped event)."
  def take_dropped(d) do
    total = d.dropped_recv + d.quiche_dropped + d.dropped_send + refused(d)
    {total - d.dropped_reported, %{d | dropped_reported: total}}
  end

  # Sends dgram_send/3 refused in callers for a full queue.
  defp refused(%{handle: nil}), do: 0
  defp refused(%{handle: ref}), do: :atomics.get(ref, @refused_slot)

  @doc "Counters for stats/1."
  def stats(d) do
    %{
      dgrams_dropped_on_receive: d.dropped_recv + d.quiche_dropped,
      dgrams_dropped_on_send: d.dropped_send + refused(d)
    }
  end
end
