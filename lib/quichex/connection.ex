defmodule Quichex.Connection do
  @connect_schema [
    host: [
      type: {:or, [:string, :atom, :any]},
      required: true,
      doc: "Host name (`\"localhost\"`), IP string, or IP tuple. Names are also sent as SNI."
    ],
    port: [type: {:integer, 1, 65535}, required: true, doc: "Server UDP port."],
    config: [type: {:struct, Quichex.Config}, required: true, doc: "A `Quichex.Config`."],
    local_port: [type: {:integer, 0, 65535}, default: 0, doc: "Local UDP port (0 picks one)."],
    local_address: [
      type: :any,
      default: nil,
      doc: "Local IP tuple to bind (defaults to the wildcard of the server's family)."
    ],
    server_name: [
      type: :string,
      default: nil,
      doc: "SNI and certificate name to verify; defaults to `host` when it is a name."
    ],
    active: [
      type: :boolean,
      default: true,
      doc: "Send connection messages (`{:quic_connected, conn}`, ...) to the controlling process."
    ],
    handshake_timeout: [
      type: :timeout,
      default: 5_000,
      doc: "Milliseconds for the handshake before the connection fails."
    ],
    stream_opts: [
      type: :any,
      default: [],
      doc: "Options for streams the peer opens (see `Quichex.Stream`), e.g. `[active: true]`."
    ]
  ]

  @moduledoc """
  A QUIC connection: one `:gen_statem` process that owns the quiche
  connection (through the NIF) and, for clients, its UDP socket.

  ```
                 connect/accept
                       |
                       v
               +---------------+  handshake failed/timeout
               |  :handshaking |--------------------------+
               +---------------+                          |
                       | handshake complete               |
                       v                                  |
               +---------------+                          |
               |  :established |                          |
               +---------------+                          |
                       | close/2, peer close, idle,       |
                       | owner down                       |
                       v                                  |
               +---------------+                          |
               |   :draining   |  (CONNECTION_CLOSE sent  |
               +---------------+   or received; bounded)  |
                       | quiche closed                    |
                       v                                  v
               +---------------+                          |
               |    :closed    |<-------------------------+
               +---------------+  process exits normally
  ```

  Each event runs one driver pass: feed datagrams (or the timer) to quiche,
  dispatch stream events, take every outgoing packet in one NIF call and send
  it with UDP GSO, re-arm quiche's timer.

  ## Client

      {:ok, conn} = Quichex.Connection.connect(host: "localhost", port: 4433, config: config)
      :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional)
      :ok = Quichex.Connection.close(conn, error_code: 0, reason: "done")

  Options of `connect/1`:

  #{Quichex.Config.Schema.docs(@connect_schema)}

  ## Messages (active mode)

  The controlling process (the caller of `connect/1`, or of
  `controlling_process/2`) receives:

    * `{:quic_connected, conn}` - the handshake completed.
    * `{:quic_connection_error, conn, reason}` - the handshake failed; the
      process exits. `reason` is a `Quichex.TransportError` (for example
      `reason: :handshake_timeout` or `{:transport, 0x178, _}` for an ALPN
      mismatch) or a `Quichex.ApplicationError`.
    * `{:quic_connection_closed, conn, error_code, reason}` - an established
      connection closed. `reason` is `:local` (we called `close/2`),
      `%Quichex.ApplicationError{reason: :connection_close}` (the peer's
      application closed it), `%Quichex.TransportError{}` (a transport error,
      `reason: :idle_timeout` for the idle timer) or `:owner_down`.
    * `{:quic_stream_opened, conn, stream, direction}` - the peer opened a
      stream; see `Quichex.Stream`.

  The controlling process is monitored: when it exits, the connection closes
  with application error 0 and the process exits.

  Every call takes a timeout and returns `{:error, :closed}` once the
  connection is gone. Calls that need an established connection
  (`open_stream/3`) wait while the handshake runs.
  """

  @behaviour :gen_statem

  alias Quichex.{ApplicationError, Config, Native, Telemetry, TransportError}
  alias Quichex.Config.Schema
  alias Quichex.Connection.UDP

  @type t :: pid()

  @cid_len 16
  # Packets per connection_send call (one full GSO batch): well under a
  # millisecond of NIF work.
  @send_budget 64
  @drain_cap_ms 3_000
  # Application error code sent when the controlling process exits.
  @owner_down_code 0
  @fin_grace_ms 50
  # How long the last byte of a write may wait for the FIN (see hold_last_byte/3).
  @hold_ms 5

  ## Public API

  @doc """
  Starts a client connection and returns at once; the handshake runs in the
  connection process. The caller becomes the controlling process.

  Returns `{:error, reason}` for bad options (`ArgumentError` is raised for
  option errors), an unresolvable host (`%TransportError{reason: {:resolve, :nxdomain}}`),
  a config whose TLS files cannot be loaded, or a socket error.

      {:ok, conn} = Quichex.Connection.connect(host: "127.0.0.1", port: 4433, config: config)
  """
  @spec connect(keyword()) :: {:ok, t()} | {:error, term()}
  def connect(opts) do
    opts = Schema.validate_opts!(opts, @connect_schema)

    unless opts.config.options[:application_protos] do
      raise ArgumentError, "the config needs :application_protos to connect"
    end

    with {:ok, ip} <- resolve(opts.host),
         {:ok, native} <- Config.build(opts.config, :client) do
      args = %{
        role: :client,
        native_config: native,
        peer: {ip, opts.port},
        local_ip: opts.local_address || wildcard(ip),
        local_port: opts.local_port,
        server_name: opts.server_name || sni(opts.host),
        owner: self(),
        active: opts.active,
        handshake_timeout: opts.handshake_timeout,
        stream_opts: opts.stream_opts
      }

      sup = {:via, PartitionSupervisor, {Quichex.ConnectionSupervisor, self()}}

      case DynamicSupervisor.start_child(sup, child_spec(args)) do
        {:ok, pid} -> {:ok, pid}
        {:error, {%TransportError{} = error, _}} -> {:error, error}
        {:error, %TransportError{} = error} -> {:error, error}
        {:error, reason} -> {:error, reason}
      end
    end
  end

  @doc false
  def child_spec(args) do
    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [args]},
      restart: :temporary,
      shutdown: 5_000
    }
  end

  @doc false
  def start_link(args), do: :gen_statem.start_link(__MODULE__, args, [])

  @doc """
  Waits until the handshake completes. Returns `:ok`, `{:error, reason}` when
  the handshake failed, `{:error, :timeout}` or `{:error, :closed}`.

      :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
  """
  @spec wait_connected(t(), keyword()) :: :ok | {:error, term()}
  def wait_connected(conn, opts \\ []) do
    timeout = timeout_opt(opts)
    call(conn, :wait_connected, timeout)
  end

  @doc """
  Connection statistics: `rtt`, `min_rtt`, `rttvar` (µs), `cwnd`,
  `bytes_sent`, `bytes_received`, `bytes_lost`, `packets_sent`,
  `packets_received`, `packets_lost`, `packets_retransmitted`, `pmtu`,
  `delivery_rate`, `streams` (open stream processes), and more.

      {:ok, %{rtt: rtt}} = Quichex.Connection.stats(conn)
  """
  @spec stats(t(), keyword()) :: {:ok, map()} | {:error, term()}
  def stats(conn, opts \\ []), do: call(conn, :stats, timeout_opt(opts))

  @doc """
  Facts about the connection: `local_address`, `peer_address`, `alpn`,
  `server_name`, `is_server`, `is_established`, `is_closed`, `is_draining`,
  `state`, `retry` (Retry was used), `peer_transport_params`, `source_id`,
  `destination_id`, `peer_cert` (DER).

      {:ok, %{alpn: "echo"}} = Quichex.Connection.info(conn)
  """
  @spec info(t(), keyword()) :: {:ok, map()} | {:error, term()}
  def info(conn, opts \\ []), do: call(conn, :info, timeout_opt(opts))

  @doc "Whether the handshake has completed and the connection is open."
  @spec is_established?(t()) :: boolean()
  def is_established?(conn), do: state_of(conn) == :established

  @doc "Whether the connection is draining (closing, CONNECTION_CLOSE sent or received)."
  @spec is_draining?(t()) :: boolean()
  def is_draining?(conn), do: state_of(conn) == :draining

  @doc "Whether the connection is closed (its process is gone or about to exit)."
  @spec is_closed?(t()) :: boolean()
  def is_closed?(conn), do: state_of(conn) in [:closed, :gone]

  defp state_of(conn) do
    case call(conn, :state, 5_000) do
      {:ok, state} -> state
      {:error, _} -> :gone
    end
  end

  @doc """
  Closes the connection: sends CONNECTION_CLOSE with an application
  `:error_code` (default 0) and `:reason` (default `""`), then drains in
  the background and exits. Returns `:ok`, also when the connection was
  already closed.

      :ok = Quichex.Connection.close(conn, error_code: 0, reason: "done")
  """
  @spec close(t(), keyword()) :: :ok
  def close(conn, opts \\ []) do
    opts = Keyword.validate!(opts, error_code: 0, reason: "", timeout: 5_000)
    code = opts[:error_code]
    reason = opts[:reason]
    Schema.validate!(:error_code, {:integer, 0, 4_611_686_018_427_387_903}, code)
    Schema.validate!(:reason, :string, reason)

    case call(conn, {:close, code, reason}, opts[:timeout]) do
      :ok -> :ok
      {:error, _} -> :ok
    end
  end

  @doc """
  Makes `pid` the controlling process. Only the current controlling process
  may call it (`{:error, :not_owner}` otherwise).

      :ok = Quichex.Connection.controlling_process(conn, pid)
  """
  @spec controlling_process(t(), pid()) :: :ok | {:error, term()}
  def controlling_process(conn, pid) when is_pid(pid) do
    call(conn, {:controlling_process, self(), pid}, 5_000)
  end

  @doc """
  Opens a stream and returns its process; the caller owns it. `direction`
  is `:bidirectional` or `:unidirectional`. Options: `:active` (see
  `Quichex.Stream`, default `false`) and `:timeout` (default 5000 ms): how
  long to wait for the handshake and for stream credit from the peer
  (`{:error, :stream_limit}` when none came).

      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
  """
  @spec open_stream(t(), :bidirectional | :unidirectional, keyword()) ::
          {:ok, pid()} | {:error, term()}
  def open_stream(conn, direction \\ :bidirectional, opts \\ [])
      when direction in [:bidirectional, :unidirectional] do
    opts = Keyword.validate!(opts, active: false, timeout: 5_000)
    Quichex.Stream.validate_active!(opts[:active])
    timeout = opts[:timeout]
    Schema.validate!(:timeout, :timeout, timeout)
    deadline = deadline(timeout)
    call(conn, {:open_stream, direction, self(), opts[:active], deadline}, timeout, 1_000)
  end

  defp timeout_opt(opts) do
    opts = Keyword.validate!(opts, timeout: 5_000)
    Schema.validate!(:timeout, :timeout, opts[:timeout])
    opts[:timeout]
  end

  # A call that never hangs on a dead connection: exits become
  # {:error, :closed}, a timeout becomes {:error, :timeout}. `grace` lets the
  # connection answer a deadline it enforces itself before the call gives up.
  @doc false
  def call(conn, request, timeout, grace \\ 0) do
    call_timeout = if timeout == :infinity, do: :infinity, else: timeout + grace

    try do
      :gen_statem.call(conn, request, call_timeout)
    catch
      :exit, {:timeout, _} -> {:error, :timeout}
      :exit, _ -> {:error, :closed}
    end
  end

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  defp resolve(ip) when is_tuple(ip) and tuple_size(ip) in [4, 8] do
    case :inet.ntoa(ip) do
      {:error, _} -> raise ArgumentError, "invalid value for option :host: #{inspect(ip)}"
      _ -> {:ok, ip}
    end
  end

  defp resolve(host) when is_atom(host), do: resolve(Atom.to_string(host))

  defp resolve(host) when is_binary(host) do
    charlist = String.to_charlist(host)

    case :inet.parse_address(charlist) do
      {:ok, ip} ->
        {:ok, ip}

      {:error, _} ->
        case :inet.getaddr(charlist, :inet) do
          {:ok, ip} ->
            {:ok, ip}

          {:error, _} ->
            case :inet.getaddr(charlist, :inet6) do
              {:ok, ip} -> {:ok, ip}
              {:error, reason} -> {:error, %TransportError{reason: {:resolve, reason}}}
            end
        end
    end
  end

  defp resolve(other),
    do: raise(ArgumentError, "invalid value for option :host: #{inspect(other)}")

  defp sni(host) when is_binary(host) do
    case :inet.parse_address(String.to_charlist(host)) do
      {:ok, _} -> nil
      {:error, _} -> host
    end
  end

  defp sni(host) when is_atom(host), do: sni(Atom.to_string(host))
  defp sni(_ip), do: nil

  defp wildcard(ip) when tuple_size(ip) == 4, do: {0, 0, 0, 0}
  defp wildcard(_ip), do: {0, 0, 0, 0, 0, 0, 0, 0}

  ## Callbacks

  @impl :gen_statem
  def callback_mode, do: :state_functions

  @impl :gen_statem
  def init(args) do
    Process.flag(:trap_exit, true)

    case open(args) do
      {:ok, data} ->
        data = %{data | started_at: Telemetry.start(:connection, telemetry_meta(data))}
        actions = [{{:timeout, :handshake}, args.handshake_timeout, :handshake_timeout}]
        packets = Map.get(args, :initial_packets, [])
        {:ok, :handshaking, data, [{:next_event, :internal, {:init, packets}} | actions]}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  defp open(%{role: :client} = args) do
    scid = :crypto.strong_rand_bytes(@cid_len)

    with {:ok, socket, caps} <- udp_open(args.local_ip, args.local_port),
         {:ok, local} <- local_address(socket, args.peer),
         {:ok, native} <-
           nif_connect(args.native_config, args.server_name, scid, local, args.peer, socket) do
      {:ok, new_data(args, native, socket, true, local, caps)}
    end
  end

  defp open(%{role: :server} = args) do
    case Native.connection_accept(
           args.native_config,
           args.scid,
           args.odcid,
           args.local,
           args.peer
         ) do
      {:ok, native} ->
        data = new_data(args, native, args.socket, false, args.local, args.caps)
        {:ok, %{data | retry: args.odcid != nil, cids: args.cids, listener: args.listener}}

      {:error, reason} ->
        {:error, %TransportError{reason: reason}}
    end
  end

  defp udp_open(ip, port) do
    case UDP.open(ip, port) do
      {:ok, socket, caps} -> {:ok, socket, caps}
      {:error, reason} -> {:error, %TransportError{reason: {:socket, reason}}}
    end
  end

  # A client's socket is connected to the server: the kernel then filters
  # datagrams from elsewhere and picks the route's source address, which the
  # NIF needs as the concrete local address.
  defp local_address(socket, peer) do
    with :ok <- :socket.connect(socket, UDP.sockaddr(peer)),
         {:ok, local} <- UDP.sockname(socket) do
      {:ok, local}
    else
      {:error, reason} ->
        :socket.close(socket)
        {:error, %TransportError{reason: {:socket, reason}}}
    end
  end

  defp nif_connect(config, server_name, scid, local, peer, socket) do
    case Native.connection_connect(config, server_name, scid, local, peer) do
      {:ok, native} ->
        {:ok, native}

      {:error, reason} ->
        :socket.close(socket)
        {:error, %TransportError{reason: reason}}
    end
  end

  defp new_data(args, native, socket, owns_socket?, local, caps) do
    %{
      role: args.role,
      native: native,
      socket: socket,
      owns_socket: owns_socket?,
      gso: caps.gso,
      local: local,
      peer: args.peer,
      owner: args.owner,
      owner_ref: Process.monitor(args.owner),
      active: args.active,
      stream_opts: args.stream_opts,
      handler: Map.get(args, :handler),
      listener: nil,
      cids: [],
      retry: false,
      started_at: nil,
      connected_waiters: [],
      close_reason: nil,
      close_code: 0,
      local_close: false,
      last_recv_at: 0,
      write_blocked: false,
      # streams
      streams: %{},
      stream_ids: %{},
      want: %{},
      pending: %{},
      stopped: MapSet.new(),
      stop_count: 0,
      open_waiters: [],
      next_local: %{
        bidi: if(args.role == :client, do: 0, else: 1),
        uni: if(args.role == :client, do: 2, else: 3)
      },
      peer_floor: %{
        bidi: if(args.role == :client, do: 1, else: 0),
        uni: if(args.role == :client, do: 3, else: 2)
      },
      peer_closed: MapSet.new(),
      peer_streams_left: %{bidi: 0, uni: 0}
    }
  end

  ## State functions

  @doc false
  def handshaking(:internal, {:init, packets}, data) do
    # A client arms its socket's select by reading once.
    packets =
      if data.owns_socket do
        {read, _status} = UDP.read_batch(data.socket)
        packets ++ read
      else
        packets
      end

    drive(:handshaking, handle_packets(data, packets))
  end

  def handshaking({:call, from}, :wait_connected, data) do
    {:keep_state, %{data | connected_waiters: [from | data.connected_waiters]}}
  end

  def handshaking({:call, _from}, {:open_stream, _, _, _, _}, _data),
    do: {:keep_state_and_data, :postpone}

  def handshaking({:timeout, :handshake}, :handshake_timeout, data) do
    _ = Native.connection_close(data.native, false, 0, "handshake timeout")
    data = flush(data)
    fail(%TransportError{reason: :handshake_timeout}, data)
  end

  def handshaking(type, content, data), do: common(:handshaking, type, content, data)

  @doc false
  def established({:call, from}, :wait_connected, _data),
    do: {:keep_state_and_data, {:reply, from, :ok}}

  def established({:call, from}, {:open_stream, dir, owner, active, deadline}, data) do
    data = open_stream_now(data, from, dir, owner, active, deadline)
    drive(:established, data)
  end

  def established(:info, {:timeout, _ref, :open_stream_deadline}, data),
    do: drive(:established, expire_open_waiters(data))

  def established(type, content, data), do: common(:established, type, content, data)

  @doc false
  def draining({:timeout, :drain_cap}, _, data),
    do: {:next_state, :closed, data, {:next_event, :internal, :stop}}

  def draining({:call, from}, :wait_connected, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining({:call, from}, {:open_stream, _, _, _, _}, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def draining(type, content, data), do: common(:draining, type, content, data)

  @doc false
  def closed(:internal, :stop, data) do
    {:stop, :normal, data}
  end

  def closed({:call, from}, :state, _data),
    do: {:keep_state_and_data, {:reply, from, {:ok, :closed}}}

  def closed({:call, from}, _request, _data),
    do: {:keep_state_and_data, {:reply, from, {:error, :closed}}}

  def closed(_type, _content, _data), do: :keep_state_and_data

  # Events every open state handles the same way.
  defp common(state, :info, {:"$socket", socket, :select, _handle}, %{socket: socket} = data) do
    {packets, status} = UDP.read_batch(socket)
    data = handle_packets(data, packets)

    actions =
      case status do
        :more -> [{:next_event, :internal, :read_more}]
        _ -> []
      end

    drive(state, data, actions)
  end

  defp common(state, :internal, :read_more, data) do
    common(state, :info, {:"$socket", data.socket, :select, nil}, data)
  end

  defp common(state, :info, {:quic_packets, packets}, data) do
    drive(state, handle_packets(data, packets))
  end

  defp common(state, :info, :quichex_pass, data), do: drive(state, %{data | write_blocked: false})

  defp common(state, :info, {:quichex_flush_held, id}, data),
    do: drive(state, %{flush_held(data, id) | write_blocked: false})

  defp common(state, {:timeout, :quic}, :fire, data) do
    :ok = Native.connection_on_timeout(data.native)
    drive(state, data)
  end

  defp common(state, {:call, from}, :stats, data) do
    {:keep_state_and_data, {:reply, from, stats_reply(state, data)}}
  end

  defp common(state, {:call, from}, :info, data) do
    {:keep_state_and_data, {:reply, from, info_reply(state, data)}}
  end

  defp common(state, {:call, from}, :state, _data) do
    {:keep_state_and_data, {:reply, from, {:ok, state}}}
  end

  defp common(state, {:call, from}, {:close, code, reason}, data) do
    case Native.connection_close(data.native, true, code, reason) do
      :ok ->
        data = %{data | local_close: true, close_code: code, close_reason: :local}
        drive(state, data, [{:reply, from, :ok}])

      {:error, _} ->
        {:keep_state_and_data, {:reply, from, :ok}}
    end
  end

  defp common(_state, {:call, from}, {:controlling_process, caller, pid}, data) do
    if caller == data.owner do
      Process.demonitor(data.owner_ref, [:flush])
      data = %{data | owner: pid, owner_ref: Process.monitor(pid)}
      {:keep_state, data, {:reply, from, :ok}}
    else
      {:keep_state_and_data, {:reply, from, {:error, :not_owner}}}
    end
  end

  defp common(state, :info, {:DOWN, ref, :process, _pid, _reason}, %{owner_ref: ref} = data) do
    data = %{data | owner_ref: nil}

    case state do
      :draining ->
        :keep_state_and_data

      _ ->
        _ = Native.connection_close(data.native, true, @owner_down_code, "")
        drive(state, %{data | local_close: true, close_reason: :owner_down})
    end
  end

  defp common(state, :cast, {:stream, msg}, data) do
    drive(state, handle_stream_msg(msg, data))
  end

  defp common(state, :info, {:EXIT, pid, _reason}, data) do
    case Map.pop(data.stream_ids, pid) do
      {nil, _} -> :keep_state_and_data
      {id, ids} -> drive(state, forget_stream(%{data | stream_ids: ids}, id))
    end
  end

  defp common(state, :info, {:timeout, _ref, {:send_timeout, id, ref}}, data) do
    drive(state, expire_send(data, id, ref))
  end

  defp common(_state, {:call, from}, {:open_stream, _, _, _, _}, _data) do
    {:keep_state_and_data, {:reply, from, {:error, :closed}}}
  end

  defp common(_state, {:call, from}, _unknown, _data) do
    {:keep_state_and_data, {:reply, from, {:error, :badarg}}}
  end

  defp common(_state, _type, _content, _data), do: :keep_state_and_data

  ## Driver

  defp handle_packets(data, []), do: data

  defp handle_packets(data, packets) do
    {:ok, _accepted} = Native.connection_recv(data.native, packets)
    %{data | last_recv_at: System.monotonic_time(:millisecond), write_blocked: false}
  end

  # One pass after any input: dispatch what quiche reports, flush output,
  # re-arm the timer, move between states.
  defp drive(state, data, actions \\ []) do
    {:ok, {established?, draining?, closed?, _timeout, readable, stop_count, left_bidi, left_uni}} =
      Native.connection_poll(data.native)

    data = %{data | peer_streams_left: %{bidi: left_bidi, uni: left_uni}}

    {state, data, actions} =
      if state == :handshaking and established? do
        {:established, on_established(data), actions}
      else
        {state, data, actions}
      end

    data =
      if state == :established or (state == :draining and not closed?) do
        # Readable first: a new peer stream's process must exist before its
        # STOP_SENDING (often in the same packet) is looked for.
        data
        |> dispatch_readable(readable)
        |> check_stopped(stop_count)
        |> write_pending()
        |> retry_open_waiters()
      else
        data
      end

    {data, timeout, closed_after_send?} = flush_with_timeout(data)
    timer = {{:timeout, :quic}, timeout || :infinity, :fire}

    cond do
      closed? or closed_after_send? ->
        finish(state, data, actions)

      state != :draining and (draining? or data.local_close) ->
        data = closing(state, data)

        {:next_state, :draining, data,
         [timer, {{:timeout, :drain_cap}, @drain_cap_ms, :cap} | actions]}

      true ->
        {:next_state, state, data, [timer | actions]}
    end
  end

  defp flush(data) do
    {data, _timeout, _closed?} = flush_with_timeout(data)
    data
  end

  defp flush_with_timeout(data) do
    {:ok, {batches, more?, timeout, closed?}} = Native.connection_send(data.native, @send_budget)
    data = send_batches(data, batches)

    if more? and not closed? do
      flush_with_timeout(data)
    else
      {data, timeout, closed?}
    end
  end

  defp send_batches(data, []), do: data

  defp send_batches(data, [{to, bin, seg} | rest]) do
    case UDP.send_batch(data.socket, to, bin, seg, data.gso) do
      :ok -> send_batches(data, rest)
      {:ok, :gso_off} -> send_batches(%{data | gso: false}, rest)
      # A send error is a lost datagram to QUIC; recovery retransmits.
      {:error, _reason} -> send_batches(data, rest)
    end
  end

  defp on_established(data) do
    {:ok, info} = Native.connection_info(data.native)

    Telemetry.execute(
      [:quichex, :connection, :handshake],
      %{duration: System.monotonic_time() - data.started_at},
      Map.merge(telemetry_meta(data), %{alpn: info.alpn, retry: retry_used?(data, info)})
    )

    Enum.each(data.connected_waiters, &:gen_statem.reply(&1, :ok))
    notify_owner(data, {:quic_connected, self()})

    if data.listener do
      send_listener_notice(data)
    end

    %{data | connected_waiters: []}
  end

  defp send_listener_notice(%{listener: {listener, :active, _table}} = data) do
    send(data.owner, {:quic_connection, listener, self(), data.peer})
  end

  defp send_listener_notice(_data), do: :ok

  defp retry_used?(%{role: :server, retry: retry}, _info), do: retry

  defp retry_used?(_data, info) do
    match?(%{retry_used: true}, info.peer_transport_params)
  end

  # Entering :draining: learn why, tell the owner and the streams.
  defp closing(state, data) do
    {code, reason} = close_reason(state, data)
    announce_close(state, %{data | close_code: code, close_reason: reason})
  end

  defp announce_close(state, data) do
    notify_closed(state, data)
    end_streams(%{data | connected_waiters: []}, data.close_reason)
  end

  defp finish(state, data, actions) do
    data = if state == :draining, do: data, else: closing(state, data)
    {:next_state, :closed, data, actions ++ [{:next_event, :internal, :stop}]}
  end

  defp fail(reason, data) do
    data = announce_close(:handshaking, %{data | close_reason: reason})
    {:next_state, :closed, data, {:next_event, :internal, :stop}}
  end

  defp notify_closed(:handshaking, data) do
    reason = data.close_reason
    Enum.each(data.connected_waiters, &:gen_statem.reply(&1, {:error, reason}))
    notify_owner(data, {:quic_connection_error, self(), reason})
  end

  defp notify_closed(_state, data) do
    notify_owner(data, {:quic_connection_closed, self(), data.close_code, data.close_reason})
  end

  defp notify_owner(%{active: true, owner_ref: ref} = data, msg) when ref != nil do
    send(data.owner, msg)
  end

  defp notify_owner(_data, _msg), do: :ok

  # {error_code, reason} for the close messages.
  defp close_reason(state, data) do
    {:ok, info} = Native.connection_info(data.native)

    cond do
      data.close_reason == :local ->
        {data.close_code, :local}

      data.close_reason == :owner_down ->
        {@owner_down_code, :owner_down}

      info.peer_error != nil ->
        peer_reason(info.peer_error)

      info.is_timed_out and state == :handshaking ->
        {0, %TransportError{reason: :handshake_timeout}}

      info.is_timed_out ->
        {0, %TransportError{reason: :idle_timeout}}

      info.local_error != nil ->
        {_app?, code, phrase} = info.local_error
        {code, %TransportError{reason: {:transport, code, phrase}}}

      true ->
        {0, %TransportError{reason: :closed}}
    end
  end

  defp peer_reason({true, code, phrase}),
    do: {code, %ApplicationError{code: code, reason: :connection_close, phrase: phrase}}

  defp peer_reason({false, code, phrase}),
    do: {code, %TransportError{reason: {:transport, code, phrase}}}

  @impl :gen_statem
  def terminate(reason, state, data) when is_map(data) do
    # Stopped from outside (a listener or application shutting down) while
    # still open: tell the peer with CONNECTION_CLOSE instead of leaving it
    # to its idle timer.
    if state in [:handshaking, :established] and
         Native.connection_close(data.native, true, 0, "shutdown") == :ok do
      _ = flush(data)
    end

    if data.owns_socket, do: :socket.close(data.socket)
    if data.listener, do: unroute(data)

    Enum.each(data.connected_waiters, &:gen_statem.reply(&1, {:error, :closed}))

    for {from, _, _, _, _} <- data.open_waiters, do: :gen_statem.reply(from, {:error, :closed})

    {:ok, stats} = Native.connection_stats(data.native)

    Telemetry.stop(
      :connection,
      data.started_at || System.monotonic_time(),
      Map.put(telemetry_meta(data), :reason, data.close_reason || reason),
      %{
        bytes_sent: stats.sent_bytes,
        bytes_received: stats.recv_bytes,
        packets_sent: stats.sent,
        packets_received: stats.recv,
        packets_lost: stats.lost
      }
    )

    :ok
  end

  def terminate(_reason, _state, _data), do: :ok

  defp unroute(%{listener: {_listener, _mode, table}, cids: cids}) do
    Enum.each(cids, &:ets.delete(table, &1))
  end

  defp unroute(_data), do: :ok

  defp telemetry_meta(data), do: %{connection: self(), role: data.role, peer_address: data.peer}

  defp stats_reply(_state, data) do
    {:ok, s} = Native.connection_stats(data.native)

    {:ok,
     %{
       rtt: s.rtt,
       min_rtt: s.min_rtt,
       rttvar: s.rttvar,
       cwnd: s.cwnd,
       bytes_sent: s.sent_bytes,
       bytes_received: s.recv_bytes,
       bytes_lost: s.lost_bytes,
       bytes_acked: s.acked_bytes,
       packets_sent: s.sent,
       packets_received: s.recv,
       packets_lost: s.lost,
       packets_retransmitted: s.retrans,
       stream_bytes_retransmitted: s.stream_retrans_bytes,
       pmtu: s.pmtu,
       delivery_rate: s.delivery_rate,
       send_quantum: s.send_quantum,
       streams: map_size(data.streams),
       streams_reset_by_peer: s.reset_stream_count_remote,
       streams_stopped_by_peer: s.stopped_stream_count_remote,
       dgrams_sent: s.dgram_sent,
       dgrams_received: s.dgram_recv
     }}
  end

  defp info_reply(state, data) do
    {:ok, i} = Native.connection_info(data.native)

    {:ok,
     %{
       local_address: data.local,
       peer_address: data.peer,
       alpn: i.alpn,
       server_name: i.server_name,
       is_server: i.is_server,
       is_established: state == :established,
       is_draining: state == :draining,
       is_closed: state == :closed,
       state: state,
       retry: retry_used?(data, i),
       source_id: i.source_id,
       destination_id: i.destination_id,
       peer_cert: i.peer_cert,
       peer_transport_params: i.peer_transport_params,
       max_send_udp_payload_size: i.max_send_udp_payload_size,
       gso: data.gso,
       trace_id: i.trace_id
     }}
  end

  ## Streams

  defp bidi?(id), do: Bitwise.band(id, 2) == 0
  defp kind(id), do: if(bidi?(id), do: :bidi, else: :uni)
  defp local?(id, role), do: Bitwise.band(id, 1) == if(role == :client, do: 0, else: 1)

  defp open_stream_now(data, from, dir, owner, active, deadline) do
    kind = if dir == :bidirectional, do: :bidi, else: :uni
    id = data.next_local[kind]

    case Native.connection_stream_open(data.native, id) do
      :ok ->
        {:ok, pid} = start_stream(data, id, owner, active, :local)
        :gen_statem.reply(from, {:ok, pid})
        data = put_in(data.next_local[kind], id + 4)
        track_stream(data, id, pid)

      {:error, :stream_limit} ->
        if deadline != :infinity and System.monotonic_time(:millisecond) >= deadline do
          :gen_statem.reply(from, {:error, :stream_limit})
          data
        else
          arm_open_timer(%{
            data
            | open_waiters: data.open_waiters ++ [{from, dir, owner, active, deadline}]
          })
        end

      {:error, reason} ->
        :gen_statem.reply(from, {:error, %TransportError{reason: reason}})
        data
    end
  end

  defp arm_open_timer(data) do
    case data.open_waiters |> Enum.map(&elem(&1, 4)) |> Enum.reject(&(&1 == :infinity)) do
      [] ->
        data

      deadlines ->
        ms = max(Enum.min(deadlines) - System.monotonic_time(:millisecond), 0)
        :erlang.start_timer(ms, self(), :open_stream_deadline)
        data
    end
  end

  defp retry_open_waiters(%{open_waiters: []} = data), do: data

  defp retry_open_waiters(data) do
    {waiters, data} = {data.open_waiters, %{data | open_waiters: []}}

    Enum.reduce(waiters, data, fn {from, dir, owner, active, deadline}, acc ->
      kind = if dir == :bidirectional, do: :bidi, else: :uni

      if acc.peer_streams_left[kind] > 0 do
        open_stream_now(acc, from, dir, owner, active, deadline)
      else
        %{acc | open_waiters: acc.open_waiters ++ [{from, dir, owner, active, deadline}]}
      end
    end)
  end

  defp expire_open_waiters(data) do
    now = System.monotonic_time(:millisecond)

    {expired, waiting} =
      Enum.split_with(data.open_waiters, fn {_, _, _, _, d} -> d != :infinity and d <= now end)

    Enum.each(expired, fn {from, _, _, _, _} ->
      :gen_statem.reply(from, {:error, :stream_limit})
    end)

    %{data | open_waiters: waiting}
  end

  defp start_stream(_data, id, owner, active, initiator) do
    Quichex.Stream.start_link(%{
      conn: self(),
      id: id,
      owner: owner,
      active: active,
      initiator: initiator,
      direction: if(bidi?(id), do: :bidirectional, else: :unidirectional),
      readable: initiator == :remote or bidi?(id),
      writable: initiator == :local or bidi?(id)
    })
  end

  defp track_stream(data, id, pid) do
    %{
      data
      | streams: Map.put(data.streams, id, pid),
        stream_ids: Map.put(data.stream_ids, pid, id)
    }
  end

  defp forget_stream(data, id) do
    data =
      case Map.pop(data.pending, id) do
        {nil, _} -> data
        {%{timer: timer}, pending} -> cancel_timer(timer) && %{data | pending: pending}
      end

    data = %{
      data
      | streams: Map.delete(data.streams, id),
        want: Map.delete(data.want, id),
        stopped: MapSet.delete(data.stopped, id)
    }

    if local?(id, data.role), do: data, else: closed_peer(data, id)
  end

  defp cancel_timer(nil), do: true
  defp cancel_timer(ref), do: :erlang.cancel_timer(ref, async: true, info: false) || true

  # Peer stream ids below the floor are closed; the set holds closed ids
  # above it, so it stays small when streams finish roughly in order.
  defp closed_peer(data, id) do
    kind = kind(id)
    closed = MapSet.put(data.peer_closed, id)
    {floor, closed} = advance_floor(data.peer_floor[kind], closed)
    %{data | peer_closed: closed, peer_floor: Map.put(data.peer_floor, kind, floor)}
  end

  defp advance_floor(floor, closed) do
    if MapSet.member?(closed, floor) do
      advance_floor(floor + 4, MapSet.delete(closed, floor))
    else
      {floor, closed}
    end
  end

  defp known_closed?(data, id) do
    id < data.peer_floor[kind(id)] or MapSet.member?(data.peer_closed, id)
  end

  defp dispatch_readable(data, []), do: data

  defp dispatch_readable(data, readable) do
    {data, reads} =
      Enum.reduce(readable, {data, []}, fn id, {acc, reads} ->
        acc = maybe_new_peer_stream(acc, id)

        case acc.want do
          %{^id => max} -> {acc, [{id, max} | reads]}
          _ -> {acc, reads}
        end
      end)

    read_streams(data, reads)
  end

  defp read_streams(data, []), do: data

  defp read_streams(data, reads) do
    {:ok, {results, more?}} = Native.connection_stream_recv(data.native, reads)
    # The NIF bounds its work per call; come back for the rest after the
    # events already queued.
    if more?, do: send(self(), :quichex_pass)

    Enum.reduce(results, data, fn
      {id, {:error, reason}}, acc ->
        notify_stream(acc, id, stream_error(reason))
        %{acc | want: Map.delete(acc.want, id)}

      {id, bin, fin}, acc ->
        notify_stream(acc, id, {:quic_data, bin, fin})
        %{acc | want: Map.delete(acc.want, id)}
    end)
  end

  defp stream_error({:stream_reset, code}), do: {:quic_reset, code}
  defp stream_error(reason), do: {:quic_error, reason}

  defp notify_stream(data, id, msg) do
    case data.streams do
      %{^id => pid} -> send(pid, msg)
      _ -> :ok
    end
  end

  defp maybe_new_peer_stream(data, id) do
    cond do
      Map.has_key?(data.streams, id) -> data
      local?(id, data.role) -> data
      known_closed?(data, id) -> data
      true -> new_peer_stream(data, id)
    end
  end

  defp new_peer_stream(data, id) do
    owner = peer_stream_owner(data, id)
    # Handler processes read with active: :once, re-armed after each callback.
    active = if data.handler, do: :once, else: Keyword.get(data.stream_opts, :active, false)

    case start_stream(data, id, owner, active, :remote) do
      {:ok, pid} -> track_stream(data, id, pid)
      _ -> data
    end
  end

  defp peer_stream_owner(%{handler: nil} = data, _id), do: data.owner

  defp peer_stream_owner(%{handler: handler} = data, id) do
    case Quichex.Handler.Runner.start_stream_handler(handler, self(), id) do
      {:ok, pid} -> pid
      _ -> data.owner
    end
  end

  # quiche counts STOP_SENDING frames; when the count grows, ask about the
  # streams we can send on that were not reported yet.
  defp check_stopped(%{stop_count: seen} = data, count) when count <= seen, do: data

  defp check_stopped(data, count) do
    ids =
      for {id, _pid} <- data.streams,
          bidi?(id) or local?(id, data.role),
          not MapSet.member?(data.stopped, id),
          do: id

    {:ok, stopped} = Native.connection_stopped_streams(data.native, ids)

    Enum.reduce(stopped, %{data | stop_count: count}, fn {id, code}, acc ->
      notify_stream(acc, id, {:quic_stopped, code})
      acc = %{acc | stopped: MapSet.put(acc.stopped, id)}
      fail_pending(acc, id, {:error, {:stopped, code}})
    end)
  end

  defp fail_pending(data, id, result) do
    case Map.pop(data.pending, id) do
      {nil, _} ->
        data

      {%{timer: timer} = entry, pending} ->
        cancel_timer(timer)
        send_result(data, id, entry, result)
        %{data | pending: pending}
    end
  end

  defp handle_stream_msg({:want, id, max}, data) do
    if Map.has_key?(data.streams, id) do
      data = %{data | want: Map.put(data.want, id, max)}
      read_streams(data, [{id, max}])
    else
      data
    end
  end

  defp handle_stream_msg({:send, id, ref, bin, fin, timeout, from}, data) do
    timer =
      case timeout do
        :infinity -> nil
        ms -> :erlang.start_timer(ms, self(), {:send_timeout, id, ref})
      end

    entry =
      case data.pending do
        # A byte held back from the previous write goes first.
        %{^id => %{ref: nil, data: held}} ->
          %{new_entry(ref, from, bin, fin, timer) | data: held <> bin}

        _ ->
          new_entry(ref, from, bin, fin, timer)
      end

    write_entries(%{data | pending: Map.put(data.pending, id, entry)}, [id])
  end

  defp handle_stream_msg({:shutdown, id, directions, code}, data) do
    Enum.each(directions, &Native.connection_stream_shutdown(data.native, id, &1, code))

    if :write in directions do
      fail_pending(data, id, {:error, :closed})
    else
      data
    end
  end

  defp new_entry(ref, from, bin, fin, timer),
    do: %{ref: ref, from: from, data: bin, fin: fin, timer: timer, fin_wait: nil, flush: false}

  # Answers the caller blocked in send/3, then tells the stream process. In
  # this order the reply is in the caller's mailbox before the stream can
  # finish and exit (which the caller's call would otherwise see first). The
  # stream queues a send that overtakes this notice.
  defp send_result(data, id, %{ref: ref, from: from}, result) do
    if from, do: :gen_statem.reply(from, result)
    if ref, do: notify_stream(data, id, {:quic_send_result, ref, result})
    :ok
  end

  defp expire_send(data, id, ref) do
    case data.pending do
      %{^id => %{ref: ^ref}} ->
        fail_pending(
          %{data | pending: Map.update!(data.pending, id, &%{&1 | timer: nil})},
          id,
          {:error, :timeout}
        )

      _ ->
        data
    end
  end

  # Pending writes are retried after packets arrived (ACKs and flow-control
  # credit are the only things that unblock them), or when asked to (new
  # data, a flushed byte, a FIN timer); a pass that moved nothing marks them
  # blocked, so a thousand waiting streams cost nothing per unrelated event.
  defp write_pending(%{pending: pending} = data) when map_size(pending) == 0, do: data
  defp write_pending(%{write_blocked: true} = data), do: data
  defp write_pending(data), do: write_entries(data, Map.keys(data.pending))

  defp write_entries(data, ids) do
    now = System.monotonic_time(:millisecond)

    writes =
      for id <- ids, %{data: bin, fin: fin} = entry = data.pending[id], writable_now?(entry) do
        {id, bin, fin, entry.flush or force_fin?(entry, data, now)}
      end

    {:ok, results} = Native.connection_stream_send(data.native, writes)
    progress? = Enum.any?(results, &(not match?({_, :done}, &1)))

    data =
      if ids == Map.keys(data.pending), do: %{data | write_blocked: not progress?}, else: data

    Enum.reduce(results, data, fn
      {id, :done}, acc ->
        defer_fin(acc, id, now)

      {id, {:error, reason}}, acc ->
        fail_pending(acc, id, {:error, send_error(reason)})

      {id, {:held, written}}, acc ->
        hold_last_byte(acc, id, written)

      {id, written}, acc ->
        %{data: bin} = entry = acc.pending[id]

        if written == byte_size(bin) do
          cancel_timer(entry.timer)
          send_result(acc, id, entry, :ok)
          %{acc | pending: Map.delete(acc.pending, id)}
        else
          rest = binary_part(bin, written, byte_size(bin) - written)
          %{acc | pending: Map.put(acc.pending, id, %{entry | data: rest})}
        end
    end)
  end

  # The NIF kept the last byte of a write back (see hold_last_byte in
  # stream.rs): the caller is answered, the byte waits for the FIN or more
  # data, or goes out alone after @hold_ms.
  defp hold_last_byte(data, id, written) do
    %{data: bin} = entry = data.pending[id]

    if written == byte_size(bin) - 1 do
      cancel_timer(entry.timer)
      send_result(data, id, entry, :ok)
      Process.send_after(self(), {:quichex_flush_held, id}, @hold_ms)

      held = %{
        entry
        | ref: nil,
          from: nil,
          timer: nil,
          data: binary_part(bin, written, 1),
          flush: false
      }

      %{data | pending: Map.put(data.pending, id, held)}
    else
      rest = binary_part(bin, written, byte_size(bin) - written)
      %{data | pending: Map.put(data.pending, id, %{entry | data: rest})}
    end
  end

  # A held byte is written with what follows it, or alone once flushed.
  defp writable_now?(%{from: nil, ref: nil, flush: flush}), do: flush
  defp writable_now?(_entry), do: true

  defp flush_held(data, id) do
    case data.pending do
      %{^id => %{ref: nil} = entry} ->
        %{data | pending: Map.put(data.pending, id, %{entry | flush: true})}

      _ ->
        data
    end
  end

  # An empty FIN waits for a pass where quiche's send capacity is exact (the
  # NIF answers :done otherwise; see write_empty_fin in connection.rs). If no
  # packet arrives for @fin_grace_ms, nothing is in flight and it is forced.
  defp defer_fin(data, id, now) do
    case data.pending[id] do
      %{data: "", fin: true, fin_wait: nil} = entry ->
        Process.send_after(self(), :quichex_pass, @fin_grace_ms + 1)
        %{data | pending: Map.put(data.pending, id, %{entry | fin_wait: now})}

      %{data: "", fin: true} ->
        Process.send_after(self(), :quichex_pass, @fin_grace_ms + 1)
        data

      _ ->
        data
    end
  end

  defp force_fin?(%{fin_wait: since}, data, now) when is_integer(since) do
    now - since >= @fin_grace_ms and data.last_recv_at <= since
  end

  defp force_fin?(_entry, _data, _now), do: false

  defp send_error({:stream_stopped, code}), do: {:stopped, code}
  defp send_error({:stream_reset, code}), do: {:reset, code}
  defp send_error(reason), do: reason

  defp end_streams(data, reason) do
    for {from, _, _, _, _} <- data.open_waiters, do: :gen_statem.reply(from, {:error, :closed})

    Enum.each(data.pending, fn {id, %{timer: timer} = entry} ->
      cancel_timer(timer)
      send_result(data, id, entry, {:error, :closed})
    end)

    Enum.each(data.streams, fn {_id, pid} -> send(pid, {:quic_conn_closed, reason}) end)
    %{data | pending: %{}, want: %{}, open_waiters: []}
  end
end
