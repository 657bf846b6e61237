defmodule Quichex.Listener.Registry do
  @moduledoc false
  # A listener's shared state. The tables and counters are made by the
  # listener's supervisor in its init (so they live exactly as long as the
  # listener, whatever restarts below it) and handed to every child:
  #
  #   * `routes` - ETS set `{cid, conn_pid}`: every connection ID in use,
  #     read by every socket process to route datagrams, written by the
  #     socket that accepts a connection and by the connection itself as it
  #     issues and retires IDs;
  #   * `by_conn` - ETS bag `{conn_pid, cid}`: the same, by connection, so a
  #     connection's routes go when it dies, however it dies;
  #   * `meta` - ETS set: `{{:socket, index}, socket}` for each open UDP
  #     socket (a connection whose socket closed sends on another),
  #     `{:local, {ip, port}}` once the first socket bound (every other
  #     socket, and any restarted one, binds the same port), `{:registry,
  #     pid}`, and the listener's telemetry start time;
  #   * `counters` - :atomics: connections open, handshakes pending. Socket
  #     processes take slots before starting a connection; this process
  #     gives them back when the handshake completes or the connection ends.
  #
  # This process monitors the connections and emits the listener's
  # telemetry stop event.

  use GenServer

  alias Quichex.Telemetry

  @conns 1
  @pending 2

  @doc "The shared tables and counters, made once per listener."
  def new_shared do
    %{
      routes: :ets.new(:quichex_routes, [:set, :public, read_concurrency: true]),
      by_conn: :ets.new(:quichex_routes_by_conn, [:bag, :public]),
      meta: :ets.new(:quichex_listener, [:set, :public, read_concurrency: true]),
      counters: :atomics.new(2, signed: true)
    }
  end

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc "The shared tables, from the registry process."
  def shared(registry), do: GenServer.call(registry, :shared)

  @doc "Tells the registry a connection's handshake completed."
  def established(%{meta: meta}) do
    case :ets.lookup(meta, :registry) do
      [{:registry, registry}] -> send(registry, {:quichex_established, self()})
      [] -> :ok
    end
  end

  @doc "The bound `{ip, port}` once the first socket chose it, or nil."
  def local(%{meta: meta}) do
    case :ets.lookup(meta, :local) do
      [{:local, local}] -> local
      [] -> nil
    end
  end

  @doc """
  Records the address a socket bound; the first one to do so starts the
  listener's telemetry span.
  """
  def bound(%{meta: meta}, local, listener) do
    if :ets.insert_new(meta, {:local, local}) do
      started = Telemetry.start(:listener, %{listener: listener, local_address: local})
      :ets.insert(meta, {:started_at, started})
    end

    :ok
  end

  @doc "Records (or forgets) the socket with `index`."
  def put_socket(%{meta: meta}, index, socket), do: :ets.insert(meta, {{:socket, index}, socket})

  def drop_socket(%{meta: meta}, index, socket),
    do: :ets.delete_object(meta, {{:socket, index}, socket})

  @doc "A socket to send on, for a connection whose socket closed; nil if none is open."
  def any_socket(%{meta: meta}) do
    case :ets.match(meta, {{:socket, :_}, :"$1"}, 1) do
      {[[socket] | _], _} -> socket
      _ -> nil
    end
  end

  @doc """
  Takes a connection slot and a pending-handshake slot, or neither:
  `:ok`, `{:error, :max_connections}` or `{:error, :max_pending}`.
  """
  def admit(%{counters: counters}, max_conns, max_pending) do
    cond do
      :atomics.add_get(counters, @conns, 1) > max_conns ->
        :atomics.sub(counters, @conns, 1)
        {:error, :max_connections}

      :atomics.add_get(counters, @pending, 1) > max_pending ->
        :atomics.sub(counters, @pending, 1)
        :atomics.sub(counters, @conns, 1)
        {:error, :max_pending}

      true ->
        :ok
    end
  end

  @doc "Gives back the slots `admit/3` took for a connection that did not start."
  def release(%{counters: counters}) do
    :atomics.sub(counters, @pending, 1)
    :atomics.sub(counters, @conns, 1)
  end

  @doc "Handshakes pending now."
  def pending(%{counters: counters}), do: :atomics.get(counters, @pending)

  @doc "Connections open now."
  def connections(%{counters: counters}), do: :atomics.get(counters, @conns)

  @doc """
  Watches a connection that `admit/3` let in: its slots come back when its
  handshake completes (`{:quichex_established, pid}` from the connection)
  and when it ends. Synchronous, so every message of the connection's comes
  after.
  """
  def track(%{meta: meta}, pid) do
    [{:registry, registry}] = :ets.lookup(meta, :registry)
    GenServer.call(registry, {:track, pid})
  end

  @doc "Routes `cids` to `pid`."
  def route(%{routes: routes, by_conn: by_conn}, pid, cids) do
    :ets.insert(routes, for(cid <- cids, do: {cid, pid}))
    :ets.insert(by_conn, for(cid <- cids, do: {pid, cid}))
    :ok
  end

  @doc "Stops routing `cids` to `pid`."
  def unroute(%{routes: routes, by_conn: by_conn}, pid, cids) do
    Enum.each(cids, fn cid ->
      :ets.delete_object(routes, {cid, pid})
      :ets.delete_object(by_conn, {pid, cid})
    end)
  end

  ## Callbacks

  @impl GenServer
  def init(opts) do
    Process.flag(:trap_exit, true)
    :ets.insert(opts.shared.meta, {:registry, self()})
    {:ok, %{shared: opts.shared, listener: opts.listener, tracked: %{}}}
  end

  @impl GenServer
  def handle_call(:shared, _from, state), do: {:reply, state.shared, state}

  def handle_call({:track, pid}, _from, state) do
    Process.monitor(pid)
    {:reply, :ok, %{state | tracked: Map.put(state.tracked, pid, :pending)}}
  end

  def handle_call(_request, _from, state), do: {:reply, {:error, :unknown_call}, state}

  @impl GenServer
  def handle_info({:quichex_established, pid}, state) do
    case state.tracked do
      %{^pid => :pending} ->
        :atomics.sub(state.shared.counters, @pending, 1)
        {:noreply, %{state | tracked: Map.put(state.tracked, pid, :established)}}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    %{routes: routes, by_conn: by_conn, counters: counters} = state.shared
    for {^pid, cid} <- :ets.lookup(by_conn, pid), do: :ets.delete_object(routes, {cid, pid})
    :ets.delete(by_conn, pid)

    case Map.pop(state.tracked, pid) do
      {nil, _} ->
        {:noreply, state}

      {status, tracked} ->
        if status == :pending, do: :atomics.sub(counters, @pending, 1)
        :atomics.sub(counters, @conns, 1)
        {:noreply, %{state | tracked: tracked}}
    end
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, state) do
    with [{:started_at, started}] <- :ets.lookup(state.shared.meta, :started_at) do
      Telemetry.stop(:listener, started, %{
        listener: state.listener,
        local_address: local(state.shared)
      })
    end

    :ok
  end
end
