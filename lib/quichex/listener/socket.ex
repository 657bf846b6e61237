defmodule Quichex.Listener.Socket do
  @moduledoc false
  # One of a listener's UDP sockets (all bound to the same address with
  # SO_REUSEPORT; the kernel spreads clients over them). Reads datagrams in
  # batches, routes each by destination connection ID through the
  # listener's shared routing table (Quichex.Listener.Registry) to its
  # connection process, whichever socket it arrived on, and handles
  # datagrams for unknown IDs itself, with no other process involved:
  # Version Negotiation, Retry, a stateless reset, a silent drop, or a new
  # connection.

  use GenServer

  import Bitwise

  alias Quichex.Connection.{CID, UDP}
  alias Quichex.Listener.{Initial, Registry}
  alias Quichex.Native

  @cid_len CID.len()
  @min_initial 1200
  @quic_v1 1
  # Stateless resets: at most this many per second per socket (a token
  # bucket), never smaller than 21 bytes (RFC 9000 section 10.3) nor as
  # large as the packet that triggered them.
  @resets_per_second 100
  @min_reset 21
  @max_reset 128

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  ## Callbacks

  @impl GenServer
  def init(opts) do
    Process.flag(:trap_exit, true)
    shared = opts.shared

    # The first socket picks the port (when the listener asked for 0); the
    # others, and any socket restarted later, bind the same one.
    port =
      case Registry.local(shared) do
        {_ip, port} -> {:ok, port}
        nil -> exclusive_port(opts)
      end

    with {:ok, port} <- port,
         {:ok, socket, caps} <- UDP.open(opts.ip, port, reuseport: opts.sockets > 1) do
      {:ok, local} = UDP.sockname(socket)
      :ok = Registry.bound(shared, local, opts.listener)
      Registry.put_socket(shared, opts.index, socket)

      state = %{
        opts: opts,
        socket: socket,
        caps: caps,
        local: local,
        shared: shared,
        reset_tokens: @resets_per_second,
        reset_refilled: System.monotonic_time(:millisecond),
        stats: %{
          accepted: 0,
          refused: 0,
          unroutable: 0,
          invalid: 0,
          invalid_initial: 0,
          version_negotiation: 0,
          retry_sent: 0,
          retry_validated: 0,
          invalid_token: 0,
          stateless_resets: 0,
          datagrams_received: 0
        }
      }

      {:ok, state, {:continue, :read}}
    else
      {:error, reason} ->
        {:stop, {:shutdown, Quichex.TransportError.new({:socket, reason})}}
    end
  end

  # SO_REUSEPORT would let a listener share a port another listener (of
  # the same OS user) already uses, each getting part of the traffic. So the
  # first socket checks the port is free with a plain bind first (and learns
  # the port when given 0); the listener's own sockets then share it.
  defp exclusive_port(%{sockets: 1} = opts), do: {:ok, opts.port}

  defp exclusive_port(opts) do
    with {:ok, probe, _caps} <- UDP.open(opts.ip, opts.port),
         {:ok, {_ip, port}} <- UDP.sockname(probe) do
      UDP.close(probe)
      {:ok, port}
    end
  end

  @impl GenServer
  def handle_continue(:read, state), do: {:noreply, read(state)}

  @impl GenServer
  # Listener requests are tagged, so that no other kind of process takes
  # them for its own (Quichex.Call).
  def handle_call({:quichex_listener, :sockname}, _from, state),
    do: {:reply, {:ok, state.local}, state}

  def handle_call({:quichex_listener, :stats}, _from, state),
    do: {:reply, {:ok, state.stats}, state}

  # A call meant for another kind of process (a Connection or Stream
  # function given this pid): answered, and nothing changes.
  def handle_call(_request, _from, state), do: {:reply, Quichex.Call.unknown_call(), state}

  @impl GenServer
  def handle_info({:"$socket", socket, :select, _}, %{socket: socket} = state) do
    {:noreply, read(state)}
  end

  def handle_info(:read_more, state), do: {:noreply, read(state)}
  def handle_info(_msg, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    # Connections that sent on this socket move to another one.
    Registry.drop_socket(state.shared, state.opts.index, state.socket)
    UDP.close(state.socket)
  end

  ## Reading and routing

  defp read(state) do
    {packets, status} = UDP.read_batch(state.socket)
    state = route(packets, state, %{})

    case status do
      :more -> send(self(), :read_more)
      _ -> :ok
    end

    state
  end

  # Groups datagrams per connection so each gets one message per read batch.
  defp route([], state, batches) do
    Enum.each(batches, fn {pid, packets} -> send(pid, {:quic_packets, Enum.reverse(packets)}) end)
    state
  end

  defp route([{from, data, seg} = packet | rest], state, batches) do
    state = bump(state, :datagrams_received)

    case dcid(data) do
      {:ok, dcid, long?} ->
        case :ets.lookup(state.shared.routes, dcid) do
          [{_, pid}] ->
            route(rest, state, Map.update(batches, pid, [packet], &[packet | &1]))

          [] when long? and seg > 0 and byte_size(data) > seg ->
            # A GRO buffer of long-header packets: handle each on its own.
            route(split(from, data, seg) ++ rest, state, batches)

          [] when long? ->
            route(rest, unknown(from, data, state), batches)

          [] ->
            route(rest, stateless_reset(from, data, dcid, state), batches)
        end

      :error ->
        route(rest, bump(state, :invalid), batches)
    end
  end

  defp split(from, data, seg) when byte_size(data) > seg do
    <<chunk::binary-size(seg), rest::binary>> = data
    [{from, chunk, 0} | split(from, rest, seg)]
  end

  defp split(from, data, _seg), do: [{from, data, 0}]

  defp dcid(<<first, _version::32, len, dcid::binary-size(len), _::binary>>)
       when (first &&& 0x80) != 0 and len <= 20,
       do: {:ok, dcid, true}

  defp dcid(<<first, dcid::binary-size(@cid_len), _::binary>>) when (first &&& 0x80) == 0,
    do: {:ok, dcid, false}

  defp dcid(_), do: :error

  defp unknown(from, data, state) do
    case Native.packet_header(data, @cid_len) do
      {:ok, {type, version, dcid, scid, token}} ->
        cond do
          not Native.packet_version_supported(version) ->
            negotiate(from, data, dcid, scid, state)

          type != :initial or byte_size(data) < @min_initial ->
            bump(state, :unroutable)

          # Checked before any state exists for it: microseconds, no process.
          not Initial.valid?(data) ->
            bump(state, :invalid_initial)

          # The client answers a Retry (or is sent one now).
          token not in [nil, ""] or retry_now?(state) ->
            retry(from, data, version, dcid, scid, token, state)

          true ->
            admit(from, data, CID.generate(state.opts.cid_generator), nil, [dcid], state)
        end

      {:error, _} ->
        bump(state, :invalid)
    end
  end

  # A short-header packet for a connection we do not know (say, one this
  # listener had before a restart): a stateless reset, whose token the
  # connection's key and ID determine, so the peer's connection closes now
  # instead of at its idle timeout.
  defp stateless_reset(from, data, dcid, state) do
    size = min(byte_size(data) - 1, @max_reset)
    state = refill_resets(state)

    if size >= @min_reset and state.reset_tokens > 0 do
      token = CID.reset_token(state.opts.stateless_reset_key, dcid)
      <<bits::6, _::2>> = :crypto.strong_rand_bytes(1)
      packet = [<<0b01::2, bits::6>>, :crypto.strong_rand_bytes(size - 17), token]
      _ = :socket.sendto(state.socket, packet, UDP.sockaddr(from))
      bump(%{state | reset_tokens: state.reset_tokens - 1}, :stateless_resets)
    else
      bump(state, :unroutable)
    end
  end

  defp refill_resets(state) do
    now = System.monotonic_time(:millisecond)
    earned = div((now - state.reset_refilled) * @resets_per_second, 1_000)

    if earned > 0,
      do: %{
        state
        | reset_tokens: min(state.reset_tokens + earned, @resets_per_second),
          reset_refilled: now
      },
      else: state
  end

  defp negotiate(from, data, dcid, scid, state) do
    # Only answer datagrams large enough to be Initials (no amplification).
    with true <- byte_size(data) >= @min_initial,
         {:ok, packet} <- Native.packet_negotiate_version(scid, dcid) do
      _ = :socket.sendto(state.socket, packet, UDP.sockaddr(from))
      bump(state, :version_negotiation)
    else
      # Too small to answer, or connection IDs longer than QUIC v1 allows.
      _ -> bump(state, :unroutable)
    end
  end

  # quiche parses an Initial without a token as an empty token.
  defp retry(from, data, version, dcid, scid, token, state) when token in [nil, ""] do
    if byte_size(data) >= @min_initial do
      new_scid = CID.generate(state.opts.cid_generator)
      token = mint_token(state, from, dcid)

      case Native.packet_retry(scid, dcid, new_scid, token, version) do
        {:ok, packet} ->
          _ = :socket.sendto(state.socket, packet, UDP.sockaddr(from))
          bump(state, :retry_sent)

        {:error, _} ->
          bump(state, :invalid)
      end
    else
      bump(state, :unroutable)
    end
  end

  defp retry(from, data, _version, dcid, _scid, token, state) do
    case validate_token(state, from, token) do
      {:ok, odcid} ->
        # quiche's accept uses the Retry's source CID (the client's new DCID) as ours.
        admit(from, data, dcid, odcid, [], bump(state, :retry_validated))

      :error ->
        bump(state, :invalid_token)
    end
  end

  # :always, :never, or {:under_load, n}: once n handshakes are pending
  # (on all of the listener's sockets).
  defp retry_now?(%{opts: %{retry: :always}}), do: true
  defp retry_now?(%{opts: %{retry: :never}}), do: false

  defp retry_now?(%{opts: %{retry: {:under_load, n}}} = state),
    do: Registry.pending(state.shared) >= n

  # Both caps hold whatever the retry mode: connections at once, and
  # handshakes in progress at once.
  defp admit(from, data, scid, odcid, extra_cids, state) do
    opts = state.opts

    case Registry.admit(state.shared, opts.max_connections, opts.max_pending_handshakes) do
      :ok -> accept(from, data, scid, odcid, extra_cids, state)
      {:error, _cap} -> bump(state, :refused)
    end
  end

  defp accept(from, data, scid, odcid, extra_cids, state) do
    opts = state.opts
    cids = [scid | extra_cids]

    args = %{
      role: :server,
      native_config: native_config(opts, from),
      socket: state.socket,
      caps: state.caps,
      local: state.local,
      peer: from,
      scid: scid,
      odcid: odcid,
      # A handler's connection process starts with the handshake and becomes
      # the owner then; in active mode the listener's owner is.
      owner: if(opts.active, do: opts.owner),
      handler: server_code(opts),
      active: true,
      stream_active: opts.stream_active,
      dgrams: Quichex.Config.dgram_opts(opts.config),
      handshake_timeout: opts.handshake_timeout,
      listener: %{
        pid: opts.listener,
        mode: listener_mode(state),
        shared: state.shared,
        client_cert: opts.client_cert
      },
      reset_key: opts.stateless_reset_key,
      cid_generator: opts.cid_generator,
      cids: cids
    }

    with {:ok, sup} <- sibling(state, :connections),
         {:ok, pid} <- start_connection(sup, args) do
      :ok = Registry.track(state.shared, pid)
      :ok = Registry.route(state.shared, pid, cids)
      # As a message, not in the child's start arguments (which its
      # supervisor keeps for the connection's life), and copied out of the
      # read buffer it is part of.
      send(pid, {:quic_packets, [{from, :binary.copy(data), 0}]})
      bump(state, :accepted)
    else
      _ ->
        Registry.release(state.shared)
        bump(state, :refused)
    end
  end

  defp start_connection(sup, args) do
    DynamicSupervisor.start_child(sup, Quichex.Connection.child_spec(args))
  catch
    # The listener is stopping.
    :exit, _ -> {:error, :closed}
  end

  # With an accept_early_data filter, a connection it refuses gets the
  # config without early data.
  defp native_config(%{accept_early_data: nil} = opts, _peer), do: opts.native_config

  defp native_config(opts, peer) do
    if opts.accept_early_data.(peer), do: opts.native_config, else: opts.native_config_no_early
  end

  defp server_code(%{handler: mod} = opts) when mod != nil,
    do: {:handler, mod, opts.handler_options}

  defp server_code(%{connection_handler: mod}) when mod != nil, do: {:connection_handler, mod}
  defp server_code(_opts), do: nil

  defp listener_mode(%{opts: %{active: true}}), do: :active
  defp listener_mode(_state), do: :handler

  # The connection supervisor starts after the sockets (so that connections
  # stop first and can still send CONNECTION_CLOSE), so it is looked up on
  # first use and remembered; it is never restarted while this process
  # lives (rest_for_one).
  defp sibling(state, id) do
    case Process.get({:sibling, id}) do
      pid when is_pid(pid) ->
        {:ok, pid}

      nil ->
        case Quichex.Listener.children(state.opts.listener) do
          %{^id => pid} when is_pid(pid) ->
            Process.put({:sibling, id}, pid)
            {:ok, pid}

          _ ->
            {:error, :no_supervisor}
        end
    end
  end

  defp bump(state, key), do: %{state | stats: Map.update!(state.stats, key, &(&1 + 1))}

  ## Retry tokens: <<expiry_ms::64, odcid_len, odcid, mac::16 bytes>>, the
  ## MAC (HMAC-SHA256 under a per-listener secret) binds the client address.

  defp mint_token(state, peer, odcid) do
    expiry = System.system_time(:millisecond) + state.opts.retry_token_lifetime
    body = <<expiry::64, byte_size(odcid), odcid::binary>>
    body <> mac(state, peer, body)
  end

  defp validate_token(state, peer, token) do
    with <<expiry::64, len, odcid::binary-size(len), tag::binary-size(16)>> <- token,
         body = binary_part(token, 0, 9 + len),
         true <- :crypto.hash_equals(mac(state, peer, body), tag),
         true <- expiry >= System.system_time(:millisecond) do
      {:ok, odcid}
    else
      _ -> :error
    end
  end

  defp mac(state, {ip, port}, body) do
    ip_bin = ip |> Tuple.to_list() |> Enum.map_join(".", &Integer.to_string/1)

    :crypto.mac(:hmac, :sha256, state.opts.retry_secret, [
      ip_bin,
      <<port::16, @quic_v1::32>>,
      body
    ])
    |> binary_part(0, 16)
  end
end
