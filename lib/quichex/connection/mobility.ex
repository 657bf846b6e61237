defmodule Quichex.Connection.Mobility do
  @moduledoc false
  # What moves under a connection: its connection IDs (issued to the peer up
  # to its limit, routed by the listener, unrouted when retired, rotated on
  # request) and its network paths (a client's migrate/probe, path events
  # for the owner, the server following a peer that moved).

  alias Quichex.Native
  alias Quichex.Connection.{CID, Paths, Reports, State, UDP}
  alias Quichex.Listener.Registry

  # Connection IDs issued per driver pass at most (quiche's limit is small).
  @max_new_cids 8

  ## Connection IDs

  @doc "Offers the peer new connection IDs while it accepts more."
  def refill_cids(%State{} = data, left) when left > 0 do
    cids = for _ <- 1..min(left, @max_new_cids), do: CID.generate(data.cid_generator)
    issue(data, cids, false)
  end

  def refill_cids(data, _left), do: data

  @doc "A fresh connection ID of ours; the peer is asked to retire the older ones."
  def rotate(%State{} = data) do
    cid = CID.generate(data.cid_generator)

    case issue_result(data, [cid], true) do
      {:ok, data} -> {{:ok, cid}, data}
      {:error, reason} -> {{:error, reason}, data}
    end
  end

  defp issue(data, cids, retire?) do
    case issue_result(data, cids, retire?) do
      {:ok, data} -> data
      {:error, _reason} -> data
    end
  end

  defp issue_result(data, cids, retire?) do
    pairs = for cid <- cids, do: {cid, CID.reset_token(data.reset_key, cid)}
    # Routed before the peer can learn them.
    route(data, cids)

    case Native.connection_new_scids(data.native, pairs, retire?) do
      {:ok, _seqs} ->
        {:ok, %{data | cids: cids ++ data.cids}}

      {:error, reason} ->
        unroute(data, cids)
        {:error, reason}
    end
  end

  @doc "Our connection IDs the peer retired: no longer routed to us."
  def retired(data, []), do: data

  def retired(%State{} = data, cids) do
    unroute(data, cids)
    %{data | cids: data.cids -- cids}
  end

  defp route(%State{listener: %{shared: shared}}, cids),
    do: Registry.route(shared, self(), cids)

  defp route(_data, _cids), do: :ok

  @doc false
  def unroute(%State{listener: %{shared: shared}}, cids),
    do: Registry.unroute(shared, self(), cids)

  def unroute(_data, _cids), do: :ok

  ## Paths (clients: migrate and probe)

  @doc """
  Opens a socket on `local` (`{ip, port}`, port 0 for any), probes the path
  to `peer` from it, and answers `from` once the path is validated (then,
  for `:migrate`, the connection moves to it) or failed.
  """
  def start_probe(%State{role: :server} = data, _local, _peer, _kind, from),
    do: reply(data, from, {:error, :server})

  def start_probe(%State{} = data, {ip, port}, peer, kind, from) do
    with :ok <- migration_allowed(data, kind),
         {:ok, socket, local} <- open_socket(ip, port, peer) do
      paths = Paths.put_socket(data.paths, local, socket)
      probe(%{data | paths: paths}, local, peer, kind, from)
    else
      {:error, reason} -> reply(data, from, {:error, reason})
    end
  end

  # Probes from the new socket; without a spare connection ID of the peer's
  # yet (just after the handshake), waits for one (bounded by the caller's
  # timeout).
  defp probe(data, local, peer, kind, from) do
    case Native.connection_probe_path(data.native, local, peer) do
      {:ok, _seq} ->
        {id, _new?, paths} = Paths.id(data.paths, local, peer)
        data = %{data | paths: Paths.wait(paths, local, peer, kind, from)}
        Reports.notify_owner(data, {:quic_path_created, self(), id, local, peer})
        data

      {:error, :out_of_identifiers} ->
        waiting = data.paths.waiting_cid ++ [{local, peer, kind, from}]
        %{data | paths: %{data.paths | waiting_cid: waiting}}

      {:error, reason} ->
        data = %{data | paths: Paths.close_socket(data.paths, local)}
        reply(data, from, {:error, reason})
    end
  end

  @doc "Probes that waited for a spare connection ID of the peer's, now that it gave some."
  def retry_probes(%State{paths: %Paths{waiting_cid: []}} = data, _dcids_left), do: data
  def retry_probes(data, 0), do: data

  def retry_probes(%State{} = data, _dcids_left) do
    waiting = data.paths.waiting_cid
    data = %{data | paths: %{data.paths | waiting_cid: []}}

    Enum.reduce(waiting, data, fn {local, peer, kind, from}, acc ->
      probe(acc, local, peer, kind, from)
    end)
  end

  defp reply(data, from, reply) do
    :gen_statem.reply(from, reply)
    data
  end

  # RFC 9000 section 9: a client must not migrate when the server's
  # disable_active_migration transport parameter says so (probing is fine).
  defp migration_allowed(_data, :probe), do: :ok

  defp migration_allowed(data, :migrate) do
    case Native.connection_info(data.native) do
      {:ok, %{peer_transport_params: %{disable_active_migration: true}}} ->
        {:error, :migration_disabled}

      _ ->
        :ok
    end
  end

  defp open_socket(ip, port, {peer_ip, _} = peer) when tuple_size(ip) == tuple_size(peer_ip) do
    with {:ok, socket, _caps} <- UDP.open(ip, port),
         :ok <- :socket.connect(socket, UDP.sockaddr(peer)),
         {:ok, local} <- UDP.sockname(socket) do
      # Arms the select: a {:"$socket", socket, :select, _} comes with data.
      {_packets, _status} = UDP.read_batch(socket)
      {:ok, socket, local}
    else
      {:error, reason} -> {:error, Reports.transport_error({:socket, reason})}
    end
  end

  defp open_socket(_ip, _port, _peer), do: {:error, :address_family}

  @doc """
  The probe (or migration) of caller `from` ran out of time: answered with
  `{:error, :timeout}`; its socket closes unless the connection uses it.
  Nothing when it already ended.
  """
  def probe_expired(%State{paths: paths} = data, from) do
    pending = Enum.find(paths.pending, fn {_addrs, {_kind, f}} -> f == from end)
    waiting = Enum.find(paths.waiting_cid, fn {_l, _p, _kind, f} -> f == from end)

    case {pending, waiting} do
      {{{local, _peer} = addrs, _}, _} ->
        paths = %{paths | pending: Map.delete(paths.pending, addrs)}
        timed_out(%{data | paths: paths}, local, from)

      {nil, {local, _peer, _kind, _from} = entry} ->
        paths = %{paths | waiting_cid: List.delete(paths.waiting_cid, entry)}
        timed_out(%{data | paths: paths}, local, from)

      {nil, nil} ->
        data
    end
  end

  defp timed_out(data, local, from) do
    :gen_statem.reply(from, {:error, :timeout})

    if local != data.local,
      do: %{data | paths: Paths.close_socket(data.paths, local)},
      else: data
  end

  ## Path events

  @doc "The path events of a poll, told to the owner and the waiting callers."
  def path_events(data, []), do: data
  def path_events(%State{} = data, events), do: Enum.reduce(events, data, &path_event/2)

  defp path_event({:new, local, peer}, data) do
    {id, new?, paths} = Paths.id(data.paths, local, peer)
    if new?, do: Reports.notify_owner(data, {:quic_path_created, self(), id, local, peer})
    %{data | paths: paths}
  end

  defp path_event({:validated, local, peer}, data) do
    {id, _new?, paths} = Paths.id(data.paths, local, peer)
    {waiter, paths} = Paths.take_waiter(paths, local, peer)
    data = %{data | paths: paths}
    Reports.notify_owner(data, {:quic_path_validated, self(), id})

    case waiter do
      {:migrate, from} ->
        case Native.connection_migrate(data.native, local, peer) do
          {:ok, _seq} ->
            :gen_statem.reply(from, {:ok, id})
            %{data | local: local, peer: peer}

          {:error, reason} ->
            reply(data, from, {:error, reason})
        end

      {:probe, from} ->
        reply(data, from, {:ok, id})

      nil ->
        data
    end
  end

  defp path_event({:failed, local, peer}, data) do
    {id, _new?, paths} = Paths.id(data.paths, local, peer)
    {waiter, paths} = Paths.take_waiter(paths, local, peer)
    data = %{data | paths: paths}
    Reports.notify_owner(data, {:quic_path_failed, self(), id, :validation_failed})
    if waiter, do: :gen_statem.reply(elem(waiter, 1), {:error, :validation_failed})
    # A client's socket for a path that failed is of no use any more.
    if local != data.local, do: %{data | paths: Paths.close_socket(data.paths, local)}, else: data
  end

  defp path_event({:peer_migrated, _local, peer}, data) do
    Reports.notify_owner(data, {:quic_peer_migrated, self(), data.peer, peer})
    %{data | peer: peer}
  end

  defp path_event({:closed, local, _peer}, data) do
    if data.role == :client and local != data.local,
      do: %{data | paths: Paths.close_socket(data.paths, local)},
      else: data
  end

  defp path_event(_reused_cid, data), do: data

  @doc "Every path quiche knows: `[map]` with our path ids."
  def paths(%State{} = data) do
    {:ok, paths} = Native.connection_paths(data.native)

    Enum.map_reduce(paths, data, fn path, acc ->
      {id, _new?, ids} = Paths.id(acc.paths, path.local, path.peer)
      {Map.put(path, :id, id), %{acc | paths: ids}}
    end)
  end
end
