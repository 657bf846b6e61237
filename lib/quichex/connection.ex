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
      doc:
        "Send connection messages (`{:quic_connected, conn}`, ...) to the controlling process; also the default `:active` of streams (see `Quichex.Stream`)."
    ],
    handshake_timeout: [
      type: :timeout,
      default: 5_000,
      doc: "Milliseconds for the handshake before the connection fails."
    ],
    stream_opts: [
      type: :keyword,
      default: [],
      doc:
        "Options for streams the peer opens: `[active: true | false | :once | n]` (default: the connection's `:active`)."
    ],
    session: [
      type: :binary,
      default: nil,
      doc:
        "A session ticket from an earlier connection to the same server (`session/2`, `{:quic_session_ticket, ...}`): resume it (no certificate exchange; `info/2` reports `resumed: true`)."
    ],
    early_data: [
      type: :boolean,
      default: false,
      doc:
        "With `:session` and `enable_early_data` in the config: open streams and send at once, as 0-RTT data, before the handshake completes. The outcome arrives as `{:quic_early_data, conn, :accepted | {:rejected, reason}}`; data the server rejected is sent again after the handshake."
    ],
    connection_id_generator: [
      type: :any,
      default: nil,
      doc: "A `Quichex.CIDGenerator` module, or `{module, options}`, for our connection IDs."
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

  Each event runs one driver pass: feed datagrams (or the timer) to quiche
  and read what became readable, take every outgoing packet in one NIF call
  and send it with UDP GSO, re-arm quiche's timer. See
  `guides/architecture.md`.

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
      `:owner_down` (the controlling process exited),
      `%Quichex.ApplicationError{reason: :connection_close}` (the peer's
      application closed it) or `%Quichex.TransportError{}` (a transport
      error; `reason: :idle_timeout` for the idle timer).
    * `{:quic_stream_opened, conn, stream, direction}` - the peer opened a
      stream, now owned by the controlling process; see `Quichex.Stream`.
    * `{:quic_dgram, conn, data}` - a DATAGRAM frame arrived (see `dgram_send/3`).
    * `{:quic_session_ticket, conn, ticket}` - (clients) the server sent a
      session ticket: pass it as `:session` to a later `connect/1` to resume.
    * `{:quic_early_data, conn, :accepted | {:rejected, reason}}` - what the
      server did with the 0-RTT data of a client that sent some (servers get
      it too when a client offered 0-RTT); `info/2` has `early_data`.
    * `{:quic_path_created, conn, path_id, local, peer}`,
      `{:quic_path_validated, conn, path_id}`,
      `{:quic_path_failed, conn, path_id, reason}` - network paths (see
      `migrate/3`); a server learns a client's new path this way.
    * `{:quic_peer_migrated, conn, old_peer, new_peer}` - (servers) the
      client moved to a new address (NAT rebinding or `migrate/3`) and the
      connection followed it.

  The controlling process is monitored: when it exits, the connection closes
  with application error 0 and the process exits.

  ## Arguments and errors

  Every function but `connect/1` takes the connection's pid. Given anything
  else it raises `ArgumentError`, as it does for a bad option (naming the
  option). Given a pid that is not a connection (a stream, a listener, the
  caller itself) it returns `{:error, :not_a_connection}` and the process
  is left alone; given a connection that has ended, `{:error, :closed}`.

  Every call takes a `:timeout`: #{Quichex.Config.Schema.timeout_doc()};
  anything else raises `ArgumentError`. Past it the call returns
  `{:error, :timeout}`. Calls that need an established connection
  (`open_stream/3`) wait while the handshake runs.
  """

  alias Quichex.{Config, TransportError}
  alias Quichex.Config.Schema
  alias Quichex.Connection.{CID, Statem}

  @type t :: pid()

  @typedoc "A stream priority (RFC 9218): urgency 0 (first) to 7, and incremental delivery."
  @type priority :: [urgency: 0..7, incremental: boolean()]

  @open_defaults [active: nil, priority: [], timeout: 5_000]

  # The errors every call can return (see "Arguments and errors").
  @call_errors "`{:error, :closed}`, `{:error, :timeout}`, `{:error, :not_a_connection}`"

  ## Public API

  @doc """
  Starts a client connection and returns at once; the handshake runs in the
  connection process. The caller becomes the controlling process.

  Returns `{:error, reason}` for an unresolvable host
  (`%TransportError{reason: {:resolve, :nxdomain}}`), a config whose TLS
  files cannot be loaded (`%TransportError{reason: {:tls_file, option,
  path}}`), a socket error (`%TransportError{reason: {:socket, posix}}`)
  or a session ticket quiche cannot use (`%TransportError{reason:
  :invalid_session}`). Bad options raise `ArgumentError` naming the option.

      {:ok, conn} = Quichex.Connection.connect(host: "127.0.0.1", port: 4433, config: config)
  """
  @spec connect(keyword()) :: {:ok, t()} | {:error, term()}
  def connect(opts) do
    opts = Schema.validate_opts!(opts, @connect_schema)

    unless Config.get(opts.config, :application_protos) do
      raise ArgumentError, "the config needs :application_protos to connect"
    end

    stream_active = stream_active!(opts.stream_opts, opts.active)

    with {:ok, ip} <- resolve(opts.host),
         {:ok, local_ip} <- local_ip(opts.local_address, ip),
         {:ok, server_name} <- server_name(opts.server_name, opts.host),
         {:ok, native} <- Config.build(opts.config, :client) do
      args = %{
        role: :client,
        native_config: native,
        peer: {ip, opts.port},
        local_ip: local_ip,
        local_port: opts.local_port,
        server_name: server_name,
        owner: self(),
        active: opts.active,
        stream_active: stream_active,
        handshake_timeout: opts.handshake_timeout,
        dgrams: Config.dgram_opts(opts.config),
        session: opts.session,
        early_data: opts.early_data and Config.get(opts.config, :enable_early_data),
        cid_generator: CID.generator!(opts.connection_id_generator, :connection_id_generator)
      }

      sup = {:via, PartitionSupervisor, {Quichex.ConnectionSupervisor, self()}}

      case DynamicSupervisor.start_child(sup, child_spec(args)) do
        {:ok, pid} -> {:ok, pid}
        {:error, {:shutdown, %TransportError{} = error}} -> {:error, error}
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
  def start_link(args),
    do: :gen_statem.start_link(Statem, args, hibernate_after: Statem.hibernate_after())

  @doc false
  # The `:active` mode of streams the peer opens: `stream_opts[:active]`,
  # else the connection's own `:active`. A bad `:stream_opts` raises
  # ArgumentError naming it.
  def stream_active!(stream_opts, default) do
    active =
      case stream_opts do
        [] -> default
        [active: active] -> active
        _other -> :invalid
      end

    unless Schema.valid?({:or, [:boolean, {:in, [:once]}, :pos_integer]}, active) do
      raise ArgumentError,
            "invalid value for option :stream_opts: expected [active: true | false | :once | n], got: #{inspect(stream_opts, limit: 10)}"
    end

    active
  end

  @doc """
  Waits until the handshake completes. Returns `:ok`, `{:error, reason}` when
  the handshake failed, `{:error, :timeout}` (after `timeout:`, default
  5000 ms), `{:error, :closed}` or `{:error, :not_a_connection}`.

      :ok = Quichex.Connection.wait_connected(conn, timeout: 5_000)
  """
  @spec wait_connected(t(), keyword()) :: :ok | {:error, term()}
  def wait_connected(conn, opts \\ []), do: call(conn, :wait_connected, timeout_opt(opts))

  @doc """
  Connection statistics: `rtt`, `min_rtt`, `rttvar` (µs), `cwnd`,
  `bytes_sent`, `bytes_received`, `bytes_lost`, `bytes_acked`,
  `packets_sent`, `packets_received`, `packets_lost`,
  `packets_retransmitted`, `stream_bytes_retransmitted`, `pmtu`,
  `delivery_rate`, `send_quantum`, `streams` (open stream processes),
  `streams_reset_by_peer`, `streams_stopped_by_peer`,
  `amplification_limited` (servers: times output was held back because the
  client's address was not validated yet and 3x what it sent had gone out),
  `paced_batches` (batches of packets held until quiche's pacer's time),
  and more. Errors: #{@call_errors}.

      {:ok, %{rtt: rtt}} = Quichex.Connection.stats(conn)
  """
  @spec stats(t(), keyword()) :: {:ok, map()} | {:error, term()}
  def stats(conn, opts \\ []), do: call(conn, :stats, timeout_opt(opts))

  @doc """
  Facts about the connection: `local_address`, `peer_address`, `alpn`,
  `server_name`, `is_server`, `is_established`, `is_closed`, `is_draining`,
  `is_resumed`, `state`, `retry` (Retry was used), `peer_transport_params`,
  `source_id`, `destination_id`, `peer_cert` (the peer's certificate, DER,
  or nil), `peer_cert_chain` (the chain it sent, leaf first, DER),
  `resumed`, `early_data`, `trace_id`, `max_send_udp_payload_size`, `gso`
  (UDP GSO in use). Errors: #{@call_errors}.

      {:ok, %{alpn: "echo"}} = Quichex.Connection.info(conn)
  """
  @spec info(t(), keyword()) :: {:ok, map()} | {:error, term()}
  def info(conn, opts \\ []), do: call(conn, :info, timeout_opt(opts))

  @doc """
  Whether the handshake has completed and the connection is open (`false`
  for a pid that is not a connection).

      true = Quichex.Connection.is_established?(conn)
  """
  @spec is_established?(t()) :: boolean()
  def is_established?(conn), do: state_of(conn) == :established

  @doc """
  Whether the connection is draining (closing, CONNECTION_CLOSE sent or
  received; `false` for a pid that is not a connection).

      false = Quichex.Connection.is_draining?(conn)
  """
  @spec is_draining?(t()) :: boolean()
  def is_draining?(conn), do: state_of(conn) == :draining

  @doc """
  Whether `conn` is no longer an open connection: closed, its process gone
  or about to exit (also `true` for a pid that is not a connection).

      false = Quichex.Connection.is_closed?(conn)
  """
  @spec is_closed?(t()) :: boolean()
  def is_closed?(conn), do: state_of(conn) in [:closed, :gone]

  defp state_of(conn) do
    case call(conn, :state, 5_000) do
      {:ok, state} when state in [:handshaking, :established, :draining, :closed] -> state
      _ -> :gone
    end
  end

  @doc """
  Closes the connection: sends CONNECTION_CLOSE with an application
  `:error_code` (default 0) and `:reason` (default `""`), then drains in
  the background and exits. Returns `:ok`, also when the connection was
  already closed; `{:error, :not_a_connection}`, or `{:error, :timeout}`
  when the connection did not take the close within `timeout:` (default
  5000 ms; it closes once it gets to it).

      :ok = Quichex.Connection.close(conn, error_code: 0, reason: "done")
  """
  @spec close(t(), keyword()) :: :ok | {:error, :not_a_connection | :timeout}
  def close(conn, opts \\ []) do
    opts = Schema.validate_keyword!(opts, error_code: 0, reason: "", timeout: 5_000)
    Schema.validate!(:error_code, :varint, opts[:error_code])
    Schema.validate!(:reason, :string, opts[:reason])
    Schema.validate!(:timeout, :timeout, opts[:timeout])

    case call(conn, {:close, opts[:error_code], opts[:reason]}, opts[:timeout]) do
      {:error, reason} when reason in [:not_a_connection, :timeout] -> {:error, reason}
      _closed -> :ok
    end
  end

  @doc """
  Makes `pid` the controlling process. Only the current controlling process
  may call it (`{:error, :not_owner}` otherwise); `pid` must be alive
  (`{:error, :dead_owner}` otherwise, and nothing changes; a pid on another
  node must be on a connected node). Also #{@call_errors}.

      :ok = Quichex.Connection.controlling_process(conn, pid)
  """
  @spec controlling_process(t(), pid()) :: :ok | {:error, term()}
  def controlling_process(conn, pid) when is_pid(pid) do
    call(conn, {:controlling_process, self(), pid}, 5_000)
  end

  @doc """
  Opens a stream and returns its process; the caller owns it. `direction`
  is `:bidirectional` or `:unidirectional`. Options:

    * `:active` - the stream's receive mode (see `Quichex.Stream`);
      defaults to the connection's `:active` (`true` unless you connected
      with `active: false`).
    * `:priority` - `[urgency: 0..7, incremental: boolean]` (RFC 9218;
      default urgency 3, incremental `true`). Lower urgency is sent first.
    * `:timeout` - milliseconds (default 5000) to wait for the handshake
      and for stream credit from the peer (`{:error, :stream_limit}` when
      none came).

  Other errors: `{:error, %Quichex.TransportError{}}` when quiche refuses
  to open the stream, #{@call_errors}.

      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
  """
  @spec open_stream(t(), :bidirectional | :unidirectional, keyword()) ::
          {:ok, pid()} | {:error, term()}
  def open_stream(conn, direction \\ :bidirectional, opts \\ [])

  def open_stream(conn, direction, opts) when direction in [:bidirectional, :unidirectional] do
    opts = Schema.validate_keyword!(opts, @open_defaults)
    if opts[:active] != nil, do: Quichex.Stream.validate_active!(opts[:active])
    {urgency, incremental} = Quichex.Stream.priority!(opts[:priority])
    timeout = opts[:timeout]
    Schema.validate!(:timeout, :timeout, timeout)

    request = %{
      kind: if(direction == :bidirectional, do: :bidi, else: :uni),
      owner: self(),
      active: opts[:active],
      urgency: urgency,
      incremental: incremental,
      deadline: deadline(timeout)
    }

    call(conn, {:open_stream, request}, timeout, 1_000)
  end

  def open_stream(_conn, direction, _opts) do
    raise ArgumentError,
          "invalid direction: expected :bidirectional or :unidirectional, got: #{inspect(direction)}"
  end

  ## Resumption, 0-RTT, migration, connection IDs

  @doc """
  The latest session ticket the server sent (clients): `{:ok, ticket}` or
  `{:error, :no_ticket}`. A ticket is an opaque binary: store it and pass
  it as `:session` to `connect/1` to resume. Other errors: #{@call_errors}.

      {:ok, ticket} = Quichex.Connection.session(conn)
      {:ok, again} = Quichex.Connection.connect(host: "localhost", port: 4433, config: config, session: ticket)
  """
  @spec session(t(), keyword()) :: {:ok, binary()} | {:error, term()}
  def session(conn, opts \\ []), do: call(conn, :session, timeout_opt(opts))

  @doc """
  Moves a client connection to a new local address: opens a UDP socket on
  `local_address` (`{ip, port}`, port 0 for any, or just an IP), probes the
  path to `peer_address` (default: the current peer) and switches to it once
  the peer answered. Returns `{:ok, path_id}` once the connection uses the
  new path, or `{:error, reason}` and the connection stays where it was:
  `:validation_failed`, `:migration_disabled` (the server's
  `disable_active_migration`), `:server` (only clients migrate),
  `:address_family`, a `Quichex.TransportError` with reason
  `{:socket, reason}` (the local address could not be bound), `:timeout`
  (the call's `:timeout`, default 5000 ms; a new path needs a spare
  connection ID from the server, which is waited for within it),
  `:closed`, `:not_a_connection`. Path events reach the owner as well.
  See the migration guide.

      {:ok, path_id} = Quichex.Connection.migrate(conn, {{127, 0, 0, 1}, 0})
  """
  @spec migrate(t(), term(), term(), keyword()) :: {:ok, non_neg_integer()} | {:error, term()}
  def migrate(conn, local_address, peer_address \\ nil, opts \\ []) do
    probe(conn, :migrate, local_address, peer_address, opts)
  end

  @doc """
  Validates the path from `local_address` to `peer_address` (a new UDP
  socket of ours, as for `migrate/3`) without moving to it: `{:ok, path_id}`
  once the peer answered, `{:error, reason}` otherwise (as for `migrate/3`).

      {:ok, path_id} = Quichex.Connection.probe_path(conn, {{127, 0, 0, 1}, 0}, nil)
  """
  @spec probe_path(t(), term(), term(), keyword()) :: {:ok, non_neg_integer()} | {:error, term()}
  def probe_path(conn, local_address, peer_address, opts \\ []) do
    probe(conn, :probe, local_address, peer_address, opts)
  end

  defp probe(conn, kind, local, peer, opts) do
    local = address!(local, :local_address, 0)
    peer = if peer == nil, do: nil, else: address!(peer, :peer_address, nil)
    timeout = timeout_opt(opts)
    # The connection gives up at `timeout` itself (closing the new socket);
    # the call waits a little longer for that answer.
    call(conn, {:probe, kind, local, peer, timeout}, timeout, 1_000)
  end

  defp address!({ip, port} = addr, option, _default) when is_tuple(ip) and is_integer(port) do
    if valid_ip?(ip) and port in 0..65_535, do: addr, else: bad_address!(addr, option)
  end

  defp address!(ip, option, default) when is_tuple(ip) and is_integer(default),
    do: address!({ip, default}, option, default)

  defp address!(other, option, _default), do: bad_address!(other, option)

  @spec bad_address!(term(), atom()) :: no_return()
  defp bad_address!(value, option) do
    raise ArgumentError,
          "invalid value for option #{inspect(option)}: expected {ip_tuple, port}, got: #{inspect(value)}"
  end

  @doc """
  The connection's network paths: `{:ok, [path]}`, each a map with `:id`,
  `:local`, `:peer`, `:active`, `:validation` (`:validated`,
  `:validating`, `:failed`, `:unknown`) and its statistics (`rtt`,
  `min_rtt`, `rttvar` in µs, `cwnd`, `pmtu`, `delivery_rate`,
  `packets_lost`, `packets_retransmitted`, `packets_sent`,
  `packets_received`, `bytes_sent`, `bytes_received`, `bytes_lost`).
  Errors: #{@call_errors}.

      {:ok, [%{id: 0, active: true}]} = Quichex.Connection.paths(conn)
  """
  @spec paths(t(), keyword()) :: {:ok, [map()]} | {:error, term()}
  def paths(conn, opts \\ []), do: call(conn, :paths, timeout_opt(opts))

  @doc """
  The path the connection sends on: `{:ok, path}` (see `paths/2`), or
  `{:error, :no_active_path}` and the errors of `paths/2`.

      {:ok, %{id: 0, peer: _peer}} = Quichex.Connection.active_path(conn)
  """
  @spec active_path(t(), keyword()) :: {:ok, map()} | {:error, term()}
  def active_path(conn, opts \\ []) do
    with {:ok, paths} <- paths(conn, opts) do
      case Enum.find(paths, & &1.active) do
        nil -> {:error, :no_active_path}
        path -> {:ok, path}
      end
    end
  end

  @doc """
  The statistics of one path, by id or by `{local, peer}`: `{:ok, path}`
  (see `paths/2`) or `{:error, :unknown_path}` and the errors of `paths/2`.

      {:ok, %{rtt: rtt, cwnd: cwnd}} = Quichex.Connection.path_stats(conn, 0)
  """
  @spec path_stats(t(), non_neg_integer() | {term(), term()}, keyword()) ::
          {:ok, map()} | {:error, term()}
  def path_stats(conn, path, opts \\ []) do
    with {:ok, paths} <- paths(conn, opts) do
      found =
        Enum.find(paths, fn p ->
          p.id == path or (is_tuple(path) and {p.local, p.peer} == path)
        end)

      if found, do: {:ok, found}, else: {:error, :unknown_path}
    end
  end

  @doc """
  Rotates our connection ID: offers the peer a fresh one and asks it to
  retire the older ones, so its packets carry an ID not seen before
  (RFC 9000 section 9.5). Returns `{:ok, cid}`, or `{:error, reason}`:
  `%Quichex.TransportError{}` when quiche cannot (the peer's
  `active_connection_id_limit`), #{@call_errors}.

      {:ok, _cid} = Quichex.Connection.rotate_cid(conn)
  """
  @spec rotate_cid(t(), keyword()) :: {:ok, binary()} | {:error, term()}
  def rotate_cid(conn, opts \\ []), do: call(conn, :rotate_cid, timeout_opt(opts))

  ## Datagrams (RFC 9221)

  @doc """
  Sends `data` (iodata) as one DATAGRAM frame: unreliable, unordered, not
  retransmitted. Needs `enable_dgram` in the config on both sides.
  Returns `:ok` once the datagram is queued (it leaves in the next driver
  pass), or `{:error, reason}`:

    * `:disabled` - our config does not enable datagrams;
    * `:not_negotiated` - the peer does not accept them;
    * `{:too_big, max}` - the payload exceeds what fits in one packet on
      the current path (`dgram_max_size/2`);
    * `:queue_full` - `dgram_send_queue_len` datagrams are already waiting;
    * `:closed` / `:timeout` / `:not_a_connection`.

  Called during the handshake, it waits until the handshake completes.

      :ok = Quichex.Connection.dgram_send(conn, "unreliable data")
  """
  @spec dgram_send(t(), iodata(), keyword()) :: :ok | {:error, term()}
  def dgram_send(conn, data, opts \\ []) do
    bin =
      try do
        IO.iodata_to_binary(data)
      rescue
        ArgumentError ->
          raise ArgumentError, "dgram_send/3 expects iodata, got: #{inspect(data, limit: 5)}"
      end

    timeout = timeout_opt(opts)

    case Quichex.Connection.Datagrams.fast_send(conn, bin) do
      :call -> call(conn, {:dgram_send, bin}, timeout)
      result -> result
    end
  end

  @doc """
  The largest datagram payload `dgram_send/3` takes now: `{:ok, bytes}`, or
  `{:error, :disabled | :not_negotiated}` and #{@call_errors}. It depends
  on the path's packet size, so it can change during the connection.

      {:ok, max} = Quichex.Connection.dgram_max_size(conn)
  """
  @spec dgram_max_size(t(), keyword()) :: {:ok, pos_integer()} | {:error, term()}
  def dgram_max_size(conn, opts \\ []), do: call(conn, :dgram_max_size, timeout_opt(opts))

  @doc """
  Receives one datagram in passive mode (a connection started with
  `active: false`): `{:ok, data}`, or `{:error, :timeout}` when none arrived
  within `:timeout` ms (default 5000), `{:error, :active}` on an active
  connection (datagrams arrive as `{:quic_dgram, conn, data}` there),
  `{:error, :closed}`, `{:error, :not_a_connection}`. At most
  `dgram_recv_queue_len` datagrams wait; when more arrive, the oldest are
  dropped (see `stats/2`).

      {:ok, data} = Quichex.Connection.dgram_recv(conn, timeout: 1_000)
  """
  @spec dgram_recv(t(), keyword()) :: {:ok, binary()} | {:error, term()}
  def dgram_recv(conn, opts \\ []) do
    timeout = timeout_opt(opts)
    call(conn, {:dgram_recv, timeout}, timeout, 1_000)
  end

  ## The plan's stream functions, by stream pid

  @doc """
  `Quichex.Stream.send/3` under the plan's name: `conn` is the stream's
  connection (not checked), `stream` the stream pid.

      :ok = Quichex.Connection.stream_send(conn, stream, "Hello", fin: false)
  """
  @spec stream_send(t(), Quichex.Stream.t(), iodata(), keyword()) :: :ok | {:error, term()}
  def stream_send(_conn, stream, data, opts \\ []), do: Quichex.Stream.send(stream, data, opts)

  @doc """
  `Quichex.Stream.recv/2` under the plan's name.

      {:ok, data, fin?} = Quichex.Connection.stream_recv(conn, stream, timeout: 5_000)
  """
  @spec stream_recv(t(), Quichex.Stream.t(), keyword()) ::
          {:ok, binary(), boolean()} | {:error, term()}
  def stream_recv(_conn, stream, opts \\ []), do: Quichex.Stream.recv(stream, opts)

  @doc """
  `Quichex.Stream.shutdown/3` under the plan's name.

      :ok = Quichex.Connection.stream_shutdown(conn, stream, :both, error_code: 0)
  """
  @spec stream_shutdown(t(), Quichex.Stream.t(), :read | :write | :both, keyword()) ::
          :ok | {:error, term()}
  def stream_shutdown(_conn, stream, how, opts \\ []),
    do: Quichex.Stream.shutdown(stream, how, opts)

  @doc """
  The connection's streams that have data (or their end) waiting to be
  received: `{:ok, [stream_pid]}`. Errors: #{@call_errors}.

      {:ok, readable} = Quichex.Connection.readable_streams(conn)
  """
  @spec readable_streams(t(), keyword()) :: {:ok, [pid()]} | {:error, term()}
  def readable_streams(conn, opts \\ []) do
    timeout = timeout_opt(opts)

    with {:ok, streams} <- call(conn, :streams, timeout) do
      {:ok, Enum.filter(streams, &Quichex.Stream.readable?/1)}
    end
  end

  @doc """
  The connection's streams that can take data now (their sending side is
  open, nothing is queued on them, and flow and congestion control leave
  room): `{:ok, [stream_pid]}`. Errors: #{@call_errors}.

      {:ok, writable} = Quichex.Connection.writable_streams(conn)
  """
  @spec writable_streams(t(), keyword()) :: {:ok, [pid()]} | {:error, term()}
  def writable_streams(conn, opts \\ []), do: call(conn, :writable_streams, timeout_opt(opts))

  defp timeout_opt(opts) do
    opts = Schema.validate_keyword!(opts, timeout: 5_000)
    Schema.validate!(:timeout, :timeout, opts[:timeout])
    opts[:timeout]
  end

  @doc false
  # A call that never hangs on a dead connection nor harms a process that
  # is not one (Quichex.Call): exits become {:error, :closed}, a timeout
  # {:error, :timeout}, another kind of process {:error, :not_a_connection}.
  # `timeout` is validated; `grace` lets the connection answer a deadline
  # it enforces itself before the call gives up.
  def call(conn, request, timeout, grace \\ 0)

  def call(conn, request, timeout, grace) when is_pid(conn) do
    call_timeout = if timeout == :infinity, do: :infinity, else: timeout + grace
    Quichex.Call.call(conn, request, call_timeout, :not_a_connection)
  end

  def call(conn, _request, _timeout, _grace) do
    raise ArgumentError, "expected a connection pid, got: #{inspect(conn)}"
  end

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  defp resolve(ip) when is_tuple(ip) do
    if valid_ip?(ip),
      do: {:ok, ip},
      else: raise(ArgumentError, "invalid value for option :host: #{inspect(ip)}")
  end

  defp resolve(host) when is_atom(host) and host not in [nil, true, false],
    do: resolve(Atom.to_string(host))

  defp resolve(host) when is_binary(host) and host != "" do
    unless String.valid?(host) and not String.contains?(host, <<0>>) do
      raise ArgumentError, "invalid value for option :host: #{inspect(host)}"
    end

    charlist = String.to_charlist(host)

    with {:error, _} <- :inet.parse_address(charlist),
         {:error, _} <- :inet.getaddr(charlist, :inet),
         {:error, reason} <- :inet.getaddr(charlist, :inet6) do
      {:error, TransportError.new({:resolve, reason})}
    end
  end

  defp resolve(other),
    do: raise(ArgumentError, "invalid value for option :host: #{inspect(other)}")

  defp valid_ip?(ip) when tuple_size(ip) in [4, 8], do: is_list(:inet.ntoa(ip))
  defp valid_ip?(_ip), do: false

  defp local_ip(nil, ip), do: {:ok, wildcard(ip)}

  defp local_ip(local, ip) do
    if valid_ip?(local) and tuple_size(local) == tuple_size(ip) do
      {:ok, local}
    else
      raise ArgumentError,
            "invalid value for option :local_address: expected an IP tuple of the server's family, got: #{inspect(local)}"
    end
  end

  defp server_name(nil, host), do: {:ok, sni(host)}

  defp server_name(name, _host) do
    if name != "" and byte_size(name) <= 255 and String.valid?(name) and
         not String.contains?(name, <<0>>) do
      {:ok, name}
    else
      raise ArgumentError,
            "invalid value for option :server_name: expected a UTF-8 host name of 1..255 bytes, got: #{inspect(name)}"
    end
  end

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
end
