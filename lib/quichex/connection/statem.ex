defmodule Quichex.Connection.Statem do
  @moduledoc false
  # The connection process: a :gen_statem with state functions.
  #
  #                connect/accept
  #                      |
  #                      v
  #              +---------------+  handshake failed/timeout
  #              |  :handshaking |--------------------------+
  #              +---------------+                          |
  #                      | handshake complete               |
  #                      v                                  |
  #              +---------------+                          |
  #              |  :established |                          |
  #              +---------------+                          |
  #                      | close/2, peer close, idle,       |
  #                      | owner down                       |
  #                      v                                  |
  #              +---------------+                          |
  #              |   :draining   |  (CONNECTION_CLOSE sent  |
  #              +---------------+   or received; bounded)  |
  #                      | quiche closed                    |
  #                      v                                  v
  #              +---------------+                          |
  #              |    :closed    |<-------------------------+
  #              +---------------+  process exits normally
  #
  # Every event that can change quiche's state ends in Transitions.drive/6:
  # one driver pass (Quichex.Connection.Driver) and the state change it
  # implies.

  @behaviour :gen_statem

  alias Quichex.{Native, Telemetry}
  alias Quichex.Connection.{Datagrams, Driver, Mobility, Paths, Reports, Requests, Setup, State}
  alias Quichex.Connection.{Streams, Transitions, UDP}

  # A connection with no event for this long hibernates: its heap shrinks
  # to its live data (an idle connection's memory, and no datagram kept
  # from its last read), and it wakes on the next message.
  @hibernate_after_ms 2_000

  @doc false
  def hibernate_after, do: @hibernate_after_ms

  ## Callbacks

  @impl :gen_statem
  def callback_mode, do: :state_functions

  @impl :gen_statem
  def init(%{role: :server} = args) do
    Process.flag(:trap_exit, true)
    # A server connection is set up by its first event, not here: the
    # listener's socket process that starts it waits for init/1 only, so
    # creating the TLS session does not hold up its routing.
    {:ok, :handshaking, {:opening, args}, {:next_event, :internal, :open}}
  end

  def init(args) do
    Process.flag(:trap_exit, true)

    case open(args) do
      {:ok, data, actions} -> {:ok, :handshaking, data, actions}
      # A shutdown exit: the caller gets {:error, reason}, nothing logs a crash.
      {:error, reason} -> {:stop, {:shutdown, reason}}
    end
  end

  defp open(args) do
    with {:ok, data} <- Setup.open(args) do
      data = %{data | started_at: Telemetry.start(:connection, Reports.telemetry_meta(data))}
      # A server's first packets arrive as a {:quic_packets, _} message
      # from its listener.
      actions = [
        {{:timeout, :handshake}, args.handshake_timeout, :expired},
        {:next_event, :internal, {:init, []}}
      ]

      {:ok, data, actions}
    end
  end

  ## State functions

  @doc false
  def handshaking(:internal, :open, {:opening, args}) do
    case open(args) do
      {:ok, data, actions} -> {:keep_state, data, actions}
      {:error, reason} -> {:stop, {:shutdown, reason}}
    end
  end

  def handshaking(:internal, {:init, packets}, %State{} = data) do
    # A client arms its socket's select by reading once.
    packets =
      if data.owns_socket do
        {read, _status} = UDP.read_batch(data.socket)
        packets ++ read
      else
        packets
      end

    Transitions.drive(:handshaking, data, packets, false)
  end

  def handshaking({:call, from}, :wait_connected, data),
    do: {:keep_state, %{data | waiters: [from | data.waiters]}}

  # With 0-RTT keys a client opens streams (and sends) before the handshake
  # completes; otherwise open_stream/3 waits for it.
  def handshaking({:call, from}, {:open_stream, request}, %State{in_early_data: true} = data) do
    data = Requests.open_stream(data, from, request)
    {:keep_state, data, open_timer(data)}
  end

  def handshaking({:call, _from}, {:open_stream, _request}, _data),
    do: {:keep_state_and_data, :postpone}

  # Whether the peer takes datagrams is known once the handshake completes.
  def handshaking({:call, _from}, {:dgram_send, _bin}, _data),
    do: {:keep_state_and_data, :postpone}

  def handshaking({:call, _from}, :dgram_max_size, _data),
    do: {:keep_state_and_data, :postpone}

  def handshaking({:call, _from}, request, _data)
      when request == :rotate_cid or (is_tuple(request) and elem(request, 0) == :probe),
      do: {:keep_state_and_data, :postpone}

  def handshaking({:timeout, :handshake}, :expired, data) do
    {:next_state, :closed, Transitions.handshake_expired(data), {:next_event, :internal, :stop}}
  end

  def handshaking(type, content, data), do: common(:handshaking, type, content, data)

  @doc false
  def established({:call, from}, :wait_connected, _data),
    do: {:keep_state_and_data, {:reply, from, :ok}}

  def established({:call, from}, {:open_stream, request}, data) do
    data = Requests.open_stream(data, from, request)
    {:keep_state, data, open_timer(data)}
  end

  def established({:timeout, :open_streams}, :expired, data) do
    data = Requests.expire_waiters(data)
    {:keep_state, data, open_timer(data)}
  end

  def established({:call, from}, {:dgram_send, bin}, data) do
    case Datagrams.send(data.dgrams, bin) do
      {:ok, dgrams} ->
        {:keep_state, Driver.schedule_pass(%{data | dgrams: dgrams}), {:reply, from, :ok}}

      {:error, reason, dgrams} ->
        {:keep_state, %{data | dgrams: dgrams}, {:reply, from, {:error, reason}}}
    end
  end

  def established({:call, from}, :dgram_max_size, data),
    do: {:keep_state_and_data, {:reply, from, Datagrams.max_size(data.dgrams)}}

  def established({:call, from}, {:probe, kind, local, peer, timeout}, data) do
    data = Mobility.start_probe(data, local, peer || data.peer, kind, from)

    expiry =
      if timeout == :infinity, do: [], else: [{{:timeout, {:probe, from}}, timeout, :expired}]

    Transitions.drive(:established, data, [], false, expiry)
  end

  def established({:call, from}, :rotate_cid, data) do
    {reply, data} = Mobility.rotate(data)
    Transitions.drive(:established, data, [], false, [{:reply, from, reply}])
  end

  def established(type, content, data), do: common(:established, type, content, data)

  @doc false
  def draining({:timeout, :drain_cap}, :expired, data),
    do: {:next_state, :closed, data, {:next_event, :internal, :stop}}

  def draining({:call, from}, :wait_connected, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining({:call, from}, {:open_stream, _request}, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining({:call, from}, {:dgram_send, _bin}, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining({:call, from}, {:dgram_recv, _timeout}, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining({:call, from}, request, _data)
      when is_tuple(request) and elem(request, 0) == :probe,
      do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining(type, content, data), do: common(:draining, type, content, data)

  @doc false
  def closed(:internal, :stop, data), do: {:stop, :normal, data}

  def closed({:call, from}, :state, _data),
    do: {:keep_state_and_data, {:reply, from, {:ok, :closed}}}

  def closed({:call, from}, _request, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def closed(_type, _content, _data), do: :keep_state_and_data

  # Events every open state handles the same way.
  defp common(state, :info, {:"$socket", socket, :select, _}, %State{socket: socket} = data) do
    read_socket(state, data, socket)
  end

  # A client's socket for a probed or migrated path.
  defp common(state, :info, {:"$socket", socket, :select, _}, data) do
    case Paths.local_of(data.paths, socket) do
      nil -> :keep_state_and_data
      _local -> read_socket(state, data, socket)
    end
  end

  defp common(state, :internal, {:read_more, socket}, data), do: read_socket(state, data, socket)

  defp common(state, :info, {:quichex_read_more, socket}, data),
    do: read_socket(state, data, socket)

  defp common(state, :info, {:quic_packets, packets}, data),
    do: Transitions.drive(state, data, packets, false)

  defp common(state, :info, :quichex_pass, data),
    do: Transitions.drive(state, %{data | pass_pending: false}, [], false)

  defp common(state, {:timeout, :quic}, :fire, data), do: Transitions.drive(state, data, [], true)

  # A migrate/probe call's time is up: it gets {:error, :timeout}, and the
  # socket opened for it closes (unless the connection moved there).
  defp common(_state, {:timeout, {:probe, from}}, :expired, data),
    do: {:keep_state, Mobility.probe_expired(data, from)}

  # quiche's pacer: batches whose time has come.
  defp common(_state, {:timeout, :pace}, :fire, data) do
    data = Driver.release_paced(data)
    {:keep_state, data, [{{:timeout, :pace}, Driver.pace_ms(data) || :infinity, :fire}]}
  end

  # A datagram dgram_send/3 checked in the caller (see Datagrams).
  defp common(_state, :cast, {:dgram, bin}, data),
    do: {:keep_state, Driver.schedule_pass(%{data | dgrams: Datagrams.queue(data.dgrams, bin)})}

  defp common(_state, :cast, {:stream, msg}, data) do
    {:keep_state, Driver.schedule_pass(Requests.stream_message(data, msg))}
  end

  # A stream's own process sending from inside a handler callback.
  defp common(_state, {:call, from}, {:stream_send, id, bin, fin, timeout}, data) do
    data = Requests.stream_message(data, {:send, id, from, bin, fin, timeout})
    {:keep_state, Driver.schedule_pass(data)}
  end

  defp common(_state, :info, {:timeout, _ref, {:write_timeout, id, ref}}, data),
    do: {:keep_state, Driver.expire_write(data, id, ref)}

  defp common(_state, {:call, from}, {:dgram_recv, _timeout}, %State{active: true}),
    do: {:keep_state_and_data, {:reply, from, {:error, :active}}}

  defp common(_state, {:call, from}, {:dgram_recv, timeout}, data) do
    case Datagrams.recv(data.dgrams, from, timeout) do
      {:reply, reply, dgrams} -> {:keep_state, %{data | dgrams: dgrams}, {:reply, from, reply}}
      {:wait, dgrams} -> {:keep_state, %{data | dgrams: dgrams}}
    end
  end

  defp common(_state, :info, {:quichex_dgram_timeout, ref}, data),
    do: {:keep_state, %{data | dgrams: Datagrams.expire(data.dgrams, ref)}}

  # A connection handler's callback raised: close, as for an owner's exit.
  defp common(state, :info, {:EXIT, pid, reason}, %State{runner: pid} = data)
       when reason != :normal do
    _ = Native.connection_close(data.native, true, Reports.owner_down_code(), "")
    Transitions.drive(state, %{data | runner: nil, closing: :owner_down}, [], false)
  end

  defp common(_state, :info, {:EXIT, pid, reason}, data) do
    case Requests.stream_exit(data, pid, reason) do
      {:ok, data} -> {:keep_state, Driver.schedule_pass(data)}
      :unknown -> :keep_state_and_data
    end
  end

  defp common(state, :info, {:DOWN, ref, :process, _pid, _reason}, %State{owner_ref: ref} = data) do
    data = %{data | owner_ref: nil}

    if state == :draining do
      {:keep_state, data}
    else
      _ = Native.connection_close(data.native, true, Reports.owner_down_code(), "")
      Transitions.drive(state, %{data | closing: :owner_down}, [], false)
    end
  end

  defp common(_state, {:call, from}, :stats, data),
    do: {:keep_state_and_data, {:reply, from, Reports.stats(data)}}

  defp common(state, {:call, from}, :info, data),
    do: {:keep_state_and_data, {:reply, from, Reports.info(state, data)}}

  defp common(_state, {:call, from}, :session, data) do
    reply = if data.session, do: {:ok, data.session}, else: {:error, :no_ticket}
    {:keep_state_and_data, {:reply, from, reply}}
  end

  defp common(_state, {:call, from}, :paths, data) do
    {paths, data} = Mobility.paths(data)
    {:keep_state, data, {:reply, from, {:ok, paths}}}
  end

  defp common(_state, {:call, from}, :streams, data),
    do: {:keep_state_and_data, {:reply, from, {:ok, Streams.pids(data.streams)}}}

  defp common(_state, {:call, from}, :writable_streams, data),
    do: {:keep_state_and_data, {:reply, from, Requests.writable_streams(data)}}

  defp common(state, {:call, from}, :state, _data),
    do: {:keep_state_and_data, {:reply, from, {:ok, state}}}

  defp common(state, {:call, from}, {:close, code, reason}, data) do
    case Native.connection_close(data.native, true, code, reason) do
      :ok ->
        data = %{data | closing: :local, close_code: code}
        Transitions.drive(state, data, [], false, [{:reply, from, :ok}])

      {:error, _already_closed} ->
        {:keep_state_and_data, {:reply, from, :ok}}
    end
  end

  # The controlling process hands over; a connection without one (a
  # Quichex.ConnectionHandler's) can be taken by any process, and the peer's
  # streams that waited for an owner go to it.
  defp common(_state, {:call, from}, {:controlling_process, caller, pid}, data) do
    cond do
      data.owner != nil and caller != data.owner ->
        {:keep_state_and_data, {:reply, from, {:error, :not_owner}}}

      not Quichex.Call.alive?(pid) ->
        {:keep_state_and_data, {:reply, from, {:error, :dead_owner}}}

      true ->
        if data.owner_ref, do: Process.demonitor(data.owner_ref, [:flush])
        if data.owner == nil, do: Requests.adopt_streams(data, pid)
        data = %{data | owner: pid, owner_ref: Process.monitor(pid)}
        {:keep_state, data, {:reply, from, :ok}}
    end
  end

  # A call meant for another kind of process (a Quichex.Stream function
  # given a connection): answered, and nothing changes.
  defp common(_state, {:call, from}, _unknown, _data),
    do: {:keep_state_and_data, {:reply, from, Quichex.Call.unknown_call()}}

  defp common(_state, _type, _content, _data), do: :keep_state_and_data

  # Reads one batch; `to` is the socket's local address when it is not the
  # connection's first (the NIF needs the address each packet came to).
  defp read_socket(state, data, socket) do
    {packets, status} = UDP.read_batch(socket)
    actions = if status == :more, do: read_more(data, socket), else: []
    to = if socket == data.socket, do: nil, else: Paths.local_of(data.paths, socket)
    Transitions.drive(state, data, packets, false, actions, to)
  end

  # A socket with more to read is read again right away, before anything
  # else; but with a probed or migrated path's socket too, through the
  # mailbox, so that the other socket's select notice (say, a PATH_RESPONSE
  # waiting there) is not held back behind a long transfer on this one
  # (quiche counts packets over 128 numbers late as duplicates).
  defp read_more(%State{paths: %Paths{sockets: sockets}}, socket) when map_size(sockets) > 0 do
    send(self(), {:quichex_read_more, socket})
    []
  end

  defp read_more(_data, socket), do: [{:next_event, :internal, {:read_more, socket}}]

  defp open_timer(data) do
    case Streams.next_deadline(data.streams) do
      nil -> {{:timeout, :open_streams}, :infinity, :expired}
      deadline -> {{:timeout, :open_streams}, deadline, :expired, [abs: true]}
    end
  end

  @impl :gen_statem
  def terminate(reason, state, %State{} = data), do: Transitions.terminated(reason, state, data)

  def terminate(_reason, _state, _data), do: :ok
end
