defmodule Quichex.Connection.Datagrams do
  @moduledoc false
  # DATAGRAM frames (RFC 9221) on one connection.
  #
  # Sending: dgram_send/2 checks the payload against what the peer accepts
  # and the send queue bound, then queues it here; the next flush hands every
  # queued payload to quiche in one NIF call, so they leave in the same GSO
  # batches as stream data. What waits here plus what quiche still holds
  # never exceeds the configured send queue length.
  #
  # Receiving: each poll takes every received payload out of quiche. In
  # active mode they go to the owner as {:quic_dgram, conn, data}, in order;
  # in passive mode they wait here for dgram_recv/2, at most the configured
  # receive queue length (the oldest is dropped first, as quiche does).

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
            dropped_reported: 0

  @type t :: %__MODULE__{}

  def new(opts) do
    %__MODULE__{
      enabled: Keyword.get(opts, :enabled, false),
      send_limit: Keyword.get(opts, :send_queue_len, 1000),
      recv_limit: Keyword.get(opts, :recv_queue_len, 1000)
    }
  end

  ## Sending

  @doc "Queues `bin` for the next flush, or says why not."
  def send(%__MODULE__{enabled: false} = d, _bin), do: {:error, :disabled, d}
  def send(%__MODULE__{max: nil} = d, _bin), do: {:error, :not_negotiated, d}

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

  @doc "What a flush reported."
  def flushed(d, out) do
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
    if timer, do: Process.cancel_timer(timer)
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
      if timer, do: Process.cancel_timer(timer)
      :gen_statem.reply(from, {:error, :closed})
    end)

    %{d | waiters: []}
  end

  @doc "Payloads dropped since the last call: `{count, d}` (for the datagrams_dropped event)."
  def take_dropped(d) do
    total = d.dropped_recv + d.quiche_dropped + d.dropped_send
    {total - d.dropped_reported, %{d | dropped_reported: total}}
  end

  @doc "Counters for stats/1."
  def stats(d) do
    %{
      dgrams_dropped_on_receive: d.dropped_recv + d.quiche_dropped,
      dgrams_dropped_on_send: d.dropped_send
    }
  end
end
