defmodule Quichex.Test.FaultProxy do
  @moduledoc false
  # A UDP proxy on loopback between one client and one server that injects
  # faults: loss, duplication, reordering, delay, corruption and blackholes.
  #
  #     {:ok, proxy, port} = FaultProxy.start_link(upstream: {{127, 0, 0, 1}, server_port}, seed: 1, drop: 0.05)
  #
  # The client talks to 127.0.0.1:`port`. The proxy forwards each datagram to
  # `upstream` from a second socket of its own and sends what comes back from
  # `upstream` to the client address it heard from last.
  #
  # Every datagram in each direction goes through, in order:
  #
  #   1. blackhole (`blackhole/2`): dropped;
  #   2. `drop: p`: dropped;
  #   3. `corrupt: p`: 1..3 random bytes XORed with a random non-zero byte;
  #   4. `duplicate: p`: sent twice;
  #   5. `delay: p`: sent after a uniform `delay_ms: {min, max}` milliseconds;
  #      else `reorder: p` (when nothing is held yet in that direction): held
  #      and sent right after the next datagram of that direction, or after
  #      `reorder_hold_ms` (default 50) if no other datagram comes;
  #      else sent now.
  #
  # Each direction draws from its own :rand state (:exsss), seeded from
  # `seed`, and every datagram takes the same five draws (plus one for a delay
  # and a few for corruption), so the n-th datagram of a direction meets the
  # same fate in every run with the same seed and rates.
  #
  # Options: `upstream: {ip, port}` (required), `seed:` (default 0), the rates
  # `drop:`, `duplicate:`, `reorder:`, `delay:`, `corrupt:` (0.0..1.0,
  # default 0.0), `delay_ms: {min, max}` (default {10, 50}), `reorder_hold_ms:`
  # and `max_lifetime_ms:` (default 120_000; the proxy then stops normally).
  #
  # The proxy only binds 127.0.0.1 and only forwards to `upstream`.

  use GenServer

  import Bitwise

  @dirs [:to_server, :to_client]
  @rate_keys [:drop, :duplicate, :reorder, :delay, :corrupt]
  @default_rates %{
    drop: 0.0,
    duplicate: 0.0,
    reorder: 0.0,
    delay: 0.0,
    corrupt: 0.0,
    delay_ms: {10, 50},
    reorder_hold_ms: 50
  }
  @counters [
    :received,
    :forwarded,
    :dropped,
    :blackholed,
    :duplicated,
    :reordered,
    :delayed,
    :corrupted,
    :send_errors
  ]
  @loopback {127, 0, 0, 1}
  @active_n 200
  @buffer_bytes 4 * 1024 * 1024

  ## API

  @doc "Starts the proxy linked to the caller: `{:ok, pid, listen_port}`."
  def start_link(opts) do
    opts =
      Keyword.validate!(
        opts,
        [:upstream, seed: 0, max_lifetime_ms: 120_000, trace: 0] ++
          Map.to_list(@default_rates)
      )

    case opts[:upstream] do
      {ip, port} when is_tuple(ip) and is_integer(port) and port in 1..65535 -> :ok
      other -> raise ArgumentError, "upstream must be {ip, port}, got: #{inspect(other)}"
    end

    unless is_integer(opts[:seed]), do: raise(ArgumentError, "seed must be an integer")

    unless is_integer(opts[:max_lifetime_ms]) and opts[:max_lifetime_ms] > 0,
      do: raise(ArgumentError, "max_lifetime_ms must be a positive integer")

    unless is_integer(opts[:trace]) and opts[:trace] >= 0,
      do: raise(ArgumentError, "trace must be a non-negative integer")

    rates = validate_rates!(Keyword.drop(opts, [:upstream, :seed, :max_lifetime_ms, :trace]))

    case GenServer.start_link(__MODULE__, {opts, Map.merge(@default_rates, rates)}) do
      {:ok, pid} -> {:ok, pid, GenServer.call(pid, :port)}
      other -> other
    end
  end

  @doc "Changes any of the rates (and `delay_ms`, `reorder_hold_ms`) at runtime."
  def set(proxy, opts), do: GenServer.call(proxy, {:set, validate_rates!(opts)})

  @doc "Drops everything, both ways, for `ms` milliseconds from now. Returns at once."
  def blackhole(proxy, ms) when is_integer(ms) and ms >= 0,
    do: GenServer.call(proxy, {:blackhole, ms})

  @doc """
  Simulates a NAT rebinding: from now on datagrams reach `upstream` from a
  new socket (a new source port). Returns the new port.

  As in a NAT, the new binding takes over when the client next sends: the
  old socket still forwards what `upstream` sends until the client's next
  datagram leaves through the new one, then closes. (A binding that died
  while the client had nothing to send would leave both sides silent until
  a keep-alive or the idle timeout: no QUIC stack can follow an address it
  has not heard from.)
  """
  def rebind(proxy), do: GenServer.call(proxy, :rebind)

  @doc "Counters per direction: `%{to_server: %{forwarded: n, ...}, to_client: %{...}}`."
  def stats(proxy), do: GenServer.call(proxy, :stats)

  @doc """
  With `trace: n` at start: the first `n` datagrams received, as
  `{monotonic_us, direction, bytes}`, oldest first.
  """
  def trace(proxy), do: GenServer.call(proxy, :trace)

  @doc "The current rates."
  def rates(proxy), do: GenServer.call(proxy, :rates)

  def stop(proxy) do
    GenServer.stop(proxy, :normal, 5_000)
  catch
    :exit, _ -> :ok
  end

  defp validate_rates!(opts) do
    Map.new(opts, fn
      {key, p} when key in @rate_keys and is_number(p) and p >= 0 and p <= 1 ->
        {key, p * 1.0}

      {:delay_ms, {min, max}}
      when is_integer(min) and is_integer(max) and 0 <= min and min <= max ->
        {:delay_ms, {min, max}}

      {:reorder_hold_ms, ms} when is_integer(ms) and ms >= 0 ->
        {:reorder_hold_ms, ms}

      {key, value} ->
        raise ArgumentError, "invalid fault proxy option #{inspect(key)}: #{inspect(value)}"
    end)
  end

  ## Callbacks

  @impl GenServer
  def init({opts, rates}) do
    sock_opts = [
      :binary,
      ip: @loopback,
      active: @active_n,
      recbuf: @buffer_bytes,
      sndbuf: @buffer_bytes,
      buffer: 65_536,
      read_packets: 64
    ]

    with {:ok, client_sock} <- :gen_udp.open(0, sock_opts),
         {:ok, upstream_sock} <- :gen_udp.open(0, sock_opts),
         {:ok, port} <- :inet.port(client_sock) do
      Process.send_after(self(), :max_lifetime, opts[:max_lifetime_ms])
      seed = opts[:seed]

      {:ok,
       %{
         client_sock: client_sock,
         upstream_sock: upstream_sock,
         old_upstream_socks: [],
         port: port,
         upstream: opts[:upstream],
         client: nil,
         sock_opts: sock_opts,
         rates: rates,
         rand: %{
           to_server: :rand.seed_s(:exsss, {seed, 1, 0x5EED}),
           to_client: :rand.seed_s(:exsss, {seed, 2, 0x5EED})
         },
         held: %{to_server: nil, to_client: nil},
         trace: {opts[:trace], []},
         blackhole_until: nil,
         stats: Map.new(@dirs, fn dir -> {dir, Map.new(@counters, &{&1, 0})} end)
       }}
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  @impl GenServer
  def handle_call(:port, _from, state), do: {:reply, state.port, state}
  def handle_call(:stats, _from, state), do: {:reply, state.stats, state}
  def handle_call(:trace, _from, state), do: {:reply, Enum.reverse(elem(state.trace, 1)), state}
  def handle_call(:rates, _from, state), do: {:reply, state.rates, state}

  def handle_call({:set, rates}, _from, state),
    do: {:reply, :ok, %{state | rates: Map.merge(state.rates, rates)}}

  def handle_call(:rebind, _from, state) do
    {:ok, sock} = :gen_udp.open(0, state.sock_opts)
    {:ok, port} = :inet.port(sock)
    old = [state.upstream_sock | state.old_upstream_socks]
    {:reply, port, %{state | upstream_sock: sock, old_upstream_socks: old}}
  end

  def handle_call({:blackhole, ms}, _from, state) do
    {:reply, :ok, %{state | blackhole_until: now() + ms}}
  end

  @impl GenServer
  def handle_info({:udp, sock, ip, port, data}, %{client_sock: sock} = state) do
    # Only loopback clients.
    if ip == @loopback do
      {:noreply, incoming(:to_server, data, %{state | client: {ip, port}})}
    else
      {:noreply, state}
    end
  end

  def handle_info({:udp, sock, ip, port, data}, state) do
    upstream? = sock == state.upstream_sock or sock in state.old_upstream_socks

    if upstream? and {ip, port} == state.upstream do
      {:noreply, incoming(:to_client, data, state)}
    else
      {:noreply, state}
    end
  end

  def handle_info({:udp_passive, sock}, state) do
    # The socket may have been closed by a rebind meanwhile: ignore errors.
    if sock in [state.client_sock, state.upstream_sock | state.old_upstream_socks],
      do: _ = :inet.setopts(sock, active: @active_n)

    {:noreply, state}
  end

  def handle_info({:deliver, dir, data}, state), do: {:noreply, emit(dir, data, state)}

  def handle_info({:release, dir, ref}, state) do
    case state.held[dir] do
      {^ref, _timer, _copies} -> {:noreply, release(dir, state)}
      _ -> {:noreply, state}
    end
  end

  def handle_info(:max_lifetime, state), do: {:stop, :normal, state}
  def handle_info(_msg, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    :gen_udp.close(state.client_sock)
    :gen_udp.close(state.upstream_sock)
    Enum.each(state.old_upstream_socks, &:gen_udp.close/1)
  end

  ## Faults

  defp incoming(dir, data, state) do
    state = bump(state, dir, :received) |> record(dir, data)
    rates = state.rates
    rand = state.rand[dir]
    {u_drop, rand} = :rand.uniform_s(rand)
    {u_corrupt, rand} = :rand.uniform_s(rand)
    {u_dup, rand} = :rand.uniform_s(rand)
    {u_delay, rand} = :rand.uniform_s(rand)
    {u_reorder, rand} = :rand.uniform_s(rand)

    cond do
      blackholed?(state) ->
        put_rand(state, dir, rand) |> bump(dir, :dropped) |> bump(dir, :blackholed)

      u_drop < rates.drop ->
        put_rand(state, dir, rand) |> bump(dir, :dropped)

      true ->
        {data, rand, state} =
          if u_corrupt < rates.corrupt and data != "" do
            {data, rand} = corrupt(data, rand)
            {data, rand, bump(state, dir, :corrupted)}
          else
            {data, rand, state}
          end

        {copies, state} =
          if u_dup < rates.duplicate,
            do: {[data, data], bump(state, dir, :duplicated)},
            else: {[data], state}

        cond do
          u_delay < rates.delay ->
            {min, max} = rates.delay_ms
            {d, rand} = :rand.uniform_s(max - min + 1, rand)
            Enum.each(copies, &Process.send_after(self(), {:deliver, dir, &1}, min + d - 1))
            put_rand(state, dir, rand) |> bump(dir, :delayed)

          u_reorder < rates.reorder and state.held[dir] == nil ->
            ref = make_ref()
            timer = Process.send_after(self(), {:release, dir, ref}, rates.reorder_hold_ms)
            state = put_rand(state, dir, rand) |> bump(dir, :reordered)
            %{state | held: Map.put(state.held, dir, {ref, timer, copies})}

          true ->
            state = put_rand(state, dir, rand)
            state = Enum.reduce(copies, state, &emit(dir, &1, &2))
            release(dir, state)
        end
    end
  end

  defp release(dir, state) do
    case state.held[dir] do
      nil ->
        state

      {_ref, timer, copies} ->
        Process.cancel_timer(timer)
        state = %{state | held: Map.put(state.held, dir, nil)}
        Enum.reduce(copies, state, &emit(dir, &1, &2))
    end
  end

  # Flips 1..3 bytes (a position may repeat).
  defp corrupt(data, rand) do
    {n, rand} = :rand.uniform_s(3, rand)

    Enum.reduce(1..n, {data, rand}, fn _, {data, rand} ->
      {pos, rand} = :rand.uniform_s(byte_size(data), rand)
      {mask, rand} = :rand.uniform_s(255, rand)
      <<pre::binary-size(pos - 1), byte, post::binary>> = data
      {<<pre::binary, bxor(byte, mask), post::binary>>, rand}
    end)
  end

  defp emit(dir, data, state) do
    cond do
      blackholed?(state) ->
        state |> bump(dir, :dropped) |> bump(dir, :blackholed)

      dir == :to_server ->
        {ip, port} = state.upstream
        state = sent(dir, :gen_udp.send(state.upstream_sock, ip, port, data), state)
        # The client sent through the new binding: the old ones are gone.
        Enum.each(state.old_upstream_socks, &:gen_udp.close/1)
        %{state | old_upstream_socks: []}

      state.client == nil ->
        bump(state, dir, :dropped)

      true ->
        {ip, port} = state.client
        sent(dir, :gen_udp.send(state.client_sock, ip, port, data), state)
    end
  end

  defp record(%{trace: {0, _}} = state, _dir, _data), do: state

  defp record(%{trace: {left, list}} = state, dir, data) do
    entry = {System.monotonic_time(:microsecond), dir, byte_size(data)}
    %{state | trace: {left - 1, [entry | list]}}
  end

  defp sent(dir, :ok, state), do: bump(state, dir, :forwarded)
  defp sent(dir, {:error, _}, state), do: bump(state, dir, :send_errors)

  defp blackholed?(%{blackhole_until: nil}), do: false
  defp blackholed?(%{blackhole_until: until}), do: now() < until

  defp put_rand(state, dir, rand), do: %{state | rand: Map.put(state.rand, dir, rand)}

  defp bump(state, dir, key) do
    %{state | stats: Map.update!(state.stats, dir, &Map.update!(&1, key, fn n -> n + 1 end))}
  end

  defp now, do: System.monotonic_time(:millisecond)
end
