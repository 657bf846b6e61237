defmodule Quichex.Test.QuicLBBalancer do
  @moduledoc false
  # A small QUIC-LB-aware layer-4 load balancer on loopback, for tests.
  #
  #     {:ok, lb, port} =
  #       QuicLBBalancer.start_link(
  #         configs: [QuicLB.new(config_id: 0, server_id_len: 1, key: key)],
  #         backends: %{<<1>> => {{127, 0, 0, 1}, port_a}, <<2>> => {{127, 0, 0, 1}, port_b}}
  #       )
  #
  # Clients talk to 127.0.0.1:`port`. For each datagram the balancer reads
  # the Destination Connection ID of its first packet and, in the order of
  # the draft's "Load Balancer Forwarding" steps:
  #
  #   1. a DCID that decodes (`QuicLB.decode/2`) to a known server ID goes to
  #      that server: `:decoded`;
  #   2. any other DCID of a long header (a client's first Initials, whose
  #      DCID the client chose) goes to a backend picked by a hash of the
  #      DCID, so every packet with that DCID lands on the same node:
  #      `:hashed`;
  #   3. a short header whose DCID does not decode goes by a hash of the
  #      client's address (the draft's baseline 4-tuple fallback):
  #      `:fallback`.
  #
  # Like a NAT-ing load balancer it forwards each client address's datagrams
  # from a socket of its own (one per client address and backend), so a
  # backend sees one peer address per client address and sees a client
  # migrate when the client does; what a backend sends to that socket is
  # relayed to the client from the balancer's own address. Short-header DCIDs
  # are read with the length their config implies (1 + server ID + nonce).
  #
  # At most `max_flows` (default 1,000) client addresses; datagrams past it
  # are dropped and counted. Stops normally after `max_lifetime_ms`
  # (default 120,000).

  use GenServer

  alias Quichex.CIDGenerator.QuicLB

  @loopback {127, 0, 0, 1}
  @active_n 100
  @buffer_bytes 2 * 1024 * 1024
  @sock_opts [
    :binary,
    ip: @loopback,
    active: @active_n,
    recbuf: @buffer_bytes,
    sndbuf: @buffer_bytes,
    read_packets: 64
  ]

  ## API

  def start_link(opts) do
    opts =
      Keyword.validate!(opts, [:configs, :backends, max_flows: 1_000, max_lifetime_ms: 120_000])

    configs = List.wrap(opts[:configs])

    unless configs != [] and Enum.all?(configs, &is_struct(&1, QuicLB)) do
      raise ArgumentError, "configs must be QuicLB configurations, got: #{inspect(configs)}"
    end

    backends = opts[:backends]

    unless is_map(backends) and map_size(backends) > 0 and
             Enum.all?(backends, fn {sid, {ip, port}} ->
               is_binary(sid) and ip == @loopback and port in 1..65_535
             end) do
      raise ArgumentError,
            "backends must map server IDs to {#{inspect(@loopback)}, port}, got: #{inspect(backends)}"
    end

    case GenServer.start_link(__MODULE__, Map.new(opts)) do
      {:ok, pid} -> {:ok, pid, GenServer.call(pid, :port)}
      other -> other
    end
  end

  @doc """
  Counters: `forwarded` (client datagrams per server ID), `replies`
  (backend datagrams relayed, per server ID), `decoded`, `hashed`,
  `fallback`, `dropped`.
  """
  def stats(lb), do: GenServer.call(lb, :stats)

  @doc "The flows: `[%{client: {ip, port}, server_id: sid, upstream_port: port}]`."
  def flows(lb), do: GenServer.call(lb, :flows)

  def stop(lb) do
    GenServer.stop(lb, :normal, 5_000)
  catch
    :exit, _ -> :ok
  end

  ## Callbacks

  @impl GenServer
  def init(opts) do
    with {:ok, front} <- :gen_udp.open(0, @sock_opts),
         {:ok, port} <- :inet.port(front) do
      Process.send_after(self(), :max_lifetime, opts.max_lifetime_ms)
      sids = Map.keys(opts.backends) |> Enum.sort()

      {:ok,
       %{
         front: front,
         port: port,
         configs: opts.configs,
         backends: opts.backends,
         sids: List.to_tuple(sids),
         max_flows: opts.max_flows,
         # {client, sid} => upstream socket; upstream socket => {client, sid}
         flows: %{},
         upstreams: %{},
         stats: %{
           forwarded: Map.new(sids, &{&1, 0}),
           replies: Map.new(sids, &{&1, 0}),
           decoded: 0,
           hashed: 0,
           fallback: 0,
           dropped: 0
         }
       }}
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  @impl GenServer
  def handle_call(:port, _from, state), do: {:reply, state.port, state}
  def handle_call(:stats, _from, state), do: {:reply, state.stats, state}

  def handle_call(:flows, _from, state) do
    flows =
      for {{client, sid}, sock} <- state.flows do
        {:ok, port} = :inet.port(sock)
        %{client: client, server_id: sid, upstream_port: port}
      end

    {:reply, flows, state}
  end

  @impl GenServer
  def handle_info({:udp, front, ip, port, data}, %{front: front} = state) do
    if ip == @loopback,
      do: {:noreply, from_client({ip, port}, data, state)},
      else: {:noreply, state}
  end

  def handle_info({:udp, sock, ip, port, data}, state) do
    case state.upstreams do
      %{^sock => {{client_ip, client_port}, sid}} ->
        if {ip, port} == Map.fetch!(state.backends, sid) do
          _ = :gen_udp.send(state.front, client_ip, client_port, data)
          {:noreply, bump(state, :replies, sid)}
        else
          {:noreply, state}
        end

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:udp_passive, sock}, state) do
    _ = :inet.setopts(sock, active: @active_n)
    {:noreply, state}
  end

  def handle_info(:max_lifetime, state), do: {:stop, :normal, state}
  def handle_info(_msg, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    :gen_udp.close(state.front)
    Enum.each(Map.keys(state.upstreams), &:gen_udp.close/1)
  end

  ## Routing

  defp from_client(client, data, state) do
    case route(client, data, state) do
      {:ok, sid, how} ->
        state = bump(state, how)

        case upstream(client, sid, state) do
          {:ok, sock, state} ->
            {ip, port} = Map.fetch!(state.backends, sid)
            _ = :gen_udp.send(sock, ip, port, data)
            bump(state, :forwarded, sid)

          :full ->
            bump(state, :dropped)
        end

      :drop ->
        bump(state, :dropped)
    end
  end

  # The server ID for a datagram, and how it was found.
  defp route(client, data, state) do
    case dcid(data, state.configs) do
      {:long, dcid} ->
        case known(dcid, state) do
          {:ok, sid} -> {:ok, sid, :decoded}
          :error -> {:ok, pick(dcid, state), :hashed}
        end

      {:short, dcid} ->
        case known(dcid, state) do
          {:ok, sid} -> {:ok, sid, :decoded}
          :error -> {:ok, pick(client, state), :fallback}
        end

      :error ->
        :drop
    end
  end

  defp known(dcid, state) do
    with {:ok, %{server_id: sid}} <- QuicLB.decode(dcid, state.configs),
         true <- Map.has_key?(state.backends, sid) do
      {:ok, sid}
    else
      _ -> :error
    end
  end

  defp pick(term, state), do: elem(state.sids, :erlang.phash2(term, tuple_size(state.sids)))

  # Long header: the DCID has its length. Short header: the length the
  # config named by the first octet's rotation bits implies; with no such
  # config the whole rest stands for the DCID (it will not decode).
  defp dcid(<<1::1, _::7, _version::32, len, dcid::binary-size(len), _::binary>>, _configs),
    do: {:long, dcid}

  defp dcid(<<0::1, _::7, cr::3, _::5, _::binary>> = data, configs) do
    <<_, rest::binary>> = data

    case Enum.find(configs, &(&1.config_id == cr)) do
      %QuicLB{server_id_len: s, nonce_len: n} when byte_size(rest) >= 1 + s + n ->
        {:short, binary_part(rest, 0, 1 + s + n)}

      _ ->
        {:short, rest}
    end
  end

  defp dcid(_data, _configs), do: :error

  defp upstream(client, sid, state) do
    case state.flows do
      %{{^client, ^sid} => sock} ->
        {:ok, sock, state}

      _ when map_size(state.flows) >= state.max_flows ->
        :full

      _ ->
        {:ok, sock} = :gen_udp.open(0, @sock_opts)

        state = %{
          state
          | flows: Map.put(state.flows, {client, sid}, sock),
            upstreams: Map.put(state.upstreams, sock, {client, sid})
        }

        {:ok, sock, state}
    end
  end

  defp bump(state, key), do: %{state | stats: Map.update!(state.stats, key, &(&1 + 1))}

  defp bump(state, key, sid),
    do: %{state | stats: Map.update!(state.stats, key, &Map.update!(&1, sid, fn n -> n + 1 end))}
end
