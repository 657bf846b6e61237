defmodule Quichex.Listener do
  @listener_schema [
    port: [type: {:integer, 0, 65535}, default: 0, doc: "UDP port (0 picks a free one)."],
    ip: [
      type: :any,
      default: {0, 0, 0, 0},
      doc: "IP tuple to bind, e.g. `{127, 0, 0, 1}` or `{0, 0, 0, 0, 0, 0, 0, 1}`."
    ],
    sockets: [
      type: {:integer, 1, 1024},
      default: nil,
      doc:
        "UDP sockets bound to the address with `SO_REUSEPORT`, each read by its own process (default: one per online scheduler). The kernel spreads clients over them; every socket routes every connection."
    ],
    config: [
      type: {:struct, Quichex.Config},
      required: true,
      doc:
        "A `Quichex.Config` with `application_protos`, a certificate chain and its private key."
    ],
    active: [
      type: :boolean,
      default: true,
      doc:
        "Without a handler: send `{:quic_connection, listener, conn, peer}` to the parent, which becomes the controlling process. Ignored with `:handler` or `:connection_handler`."
    ],
    connection_handler: [
      type: :atom,
      default: nil,
      doc:
        "A module implementing `Quichex.ConnectionHandler`: `handle_connection(conn, peer)` runs for each connection."
    ],
    handler: [
      type: :atom,
      default: nil,
      doc: "A module that does `use Quichex.Handler`; each connection and stream is served by it."
    ],
    handler_options: [type: :any, default: [], doc: "The handler's initial state."],
    max_connections: [
      type: :pos_integer,
      default: 10_000,
      doc: "Connections at once; new Initials beyond it are dropped (counted as `refused`)."
    ],
    retry: [
      type: :any,
      default: {:under_load, 256},
      doc:
        "When to validate client addresses with a stateless Retry (one extra round trip for the client, no state kept until it answers): `:always`, `:never`, or `{:under_load, n}`: once `n` handshakes are pending. `true`/`false` mean `:always`/`:never`. The default starts Retry at about 16 MB of pending handshake state. See the security guide."
    ],
    max_pending_handshakes: [
      type: :pos_integer,
      default: 1_024,
      doc:
        "Handshakes in progress at once; new Initials beyond it are dropped (counted as `refused`), whatever `:retry` says. Each costs about 60 KB (measured: 22 KB on the BEAM, the rest quiche and TLS state) until it completes or `:handshake_timeout` ends it."
    ],
    client_cert: [
      type: :any,
      default: nil,
      doc:
        "Client certificates (mutual TLS): `:none` (not asked for), `:optional` (asked for and verified against the config's CA when given), `:require` (a client without a certificate is refused during the handshake with the TLS `certificate_required` alert). Default: `:require` when the config has `verify_peer: true`, else `:none`."
    ],
    retry_token_lifetime: [
      type: :pos_integer,
      default: 10_000,
      doc: "How long a Retry token stays valid, in milliseconds."
    ],
    handshake_timeout: [
      type: :timeout,
      default: 5_000,
      doc: "Milliseconds a connection has to finish its handshake."
    ],
    stream_opts: [
      type: :keyword,
      default: [],
      doc:
        "Options for streams peers open, without a `:handler` (and for a stream a handler hands off with `Quichex.Stream.controlling_process/2`): `[active: true | false | :once | n]` (default `true`)."
    ],
    owner: [
      type: :pid,
      default: nil,
      doc: "Process that gets connections in active mode (defaults to the caller)."
    ],
    stateless_reset_key: [
      type: :binary,
      default: nil,
      doc:
        "Secret (at least 16 bytes) the stateless reset tokens of our connection IDs derive from. A listener restarted with the same key answers packets of its old connections with stateless resets they recognize. Random when not given."
    ],
    connection_id_generator: [
      type: :any,
      default: nil,
      doc:
        "A `Quichex.CIDGenerator` module, or `{module, options}`, that makes every connection ID of this listener's connections (e.g. to encode a node for a load balancer: `Quichex.CIDGenerator.QuicLB`, see the deployment guide)."
    ],
    accept_early_data: [
      type: :any,
      default: nil,
      doc:
        "With `enable_early_data` in the config: a function of the client's `{ip, port}` returning whether to accept its 0-RTT data (called in the listener's socket process: keep it fast). Refused clients still connect, with a full round trip. Default: accept (see the guide on 0-RTT's replay risk)."
    ]
  ]

  @moduledoc """
  A QUIC server: a supervision tree that owns UDP sockets on one address
  and the connections accepted on them.

  ```
  Quichex.Listener (Supervisor, :rest_for_one)
  ├── Quichex.Listener.Registry     the routing table (ETS), counters, the port
  ├── Supervisor (:one_for_one)     the sockets, `sockets:` of them
  │   ├── Quichex.Listener.Socket   reads its socket, routes datagrams by
  │   └── ...                       destination connection ID, answers
  │                                 Version Negotiation, Retry, resets
  └── DynamicSupervisor             one Quichex.Connection per client
  ```

  The sockets are bound to the same address with `SO_REUSEPORT`; the kernel
  hands each datagram to one of them, and each routes every connection's
  datagrams (a client that changes address or port keeps its connection
  whichever socket its packets reach). Connections send on the sockets
  directly; socket processes only read and route. A socket process that
  crashes is restarted on the same port without touching the connections
  or their routes. Each connection's IDs are in the routing table while it
  lives, and removed when it ends, however it ends.

  ## Active mode

      {:ok, listener} = Quichex.Listener.start_link(port: 0, config: server_config, active: true)
      {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)

      receive do
        {:quic_connection, ^listener, conn, peer_address} -> conn
      end

  The parent (or `:owner`) becomes the controlling process of every
  connection and receives the messages described in `Quichex.Connection`.

  ## Handler mode

      Quichex.Listener.start_link(port: 4433, config: server_config, handler: MyEcho)

  See `Quichex.Handler`.

  ## Options

  #{Quichex.Config.Schema.docs(@listener_schema)}
  """

  use Supervisor

  alias Quichex.Call
  alias Quichex.Config.Schema
  alias Quichex.Connection.{CID, UDP}
  alias Quichex.Listener.Registry

  @typedoc "A listener: the pid `start_link/1` returned."
  @type t :: pid()

  # The errors of every function that asks a listener something.
  @errors "`{:error, :closed}` (the listener stopped), `{:error, :not_a_listener}` " <>
            "(a live process that is not a listener, left alone)"

  @doc """
  A child spec, so a listener can live in your supervision tree:

      children = [{Quichex.Listener, port: 4433, config: config, handler: MyHandler}]

  Under a supervisor, use `:handler`, or pass `:owner` in active mode: the
  default owner is the process that starts the listener, which is then the
  supervisor. Options that are not a keyword list raise `ArgumentError`;
  the rest are checked by `start_link/1`.
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    Schema.keyword!(opts)

    %{
      id: {__MODULE__, Keyword.get(opts, :port, 0)},
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc """
  Starts a listener linked to the caller. Raises `ArgumentError` for bad
  options; returns `{:error, reason}` when the port cannot be bound
  (`%Quichex.TransportError{reason: {:socket, posix}}`, e.g. `:eaddrinuse`)
  or the config's TLS files cannot be loaded (`%Quichex.TransportError{reason:
  {:tls_file, option, path}}`). Nothing is started then, and nothing logged.

      {:ok, listener} = Quichex.Listener.start_link(port: 0, ip: {127, 0, 0, 1}, config: config)
  """
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts) do
    opts = Schema.validate_opts!(opts, @listener_schema)
    opts = %{opts | owner: opts.owner || self()}
    config = opts.config

    unless Quichex.Config.get(config, :application_protos) do
      raise ArgumentError, "the listener config needs :application_protos"
    end

    unless Quichex.Config.get(config, :load_cert_chain_from_pem_file) &&
             Quichex.Config.get(config, :load_priv_key_from_pem_file) do
      raise ArgumentError,
            "the listener config needs :load_cert_chain_from_pem_file and :load_priv_key_from_pem_file"
    end

    unless is_tuple(opts.ip) and tuple_size(opts.ip) in [4, 8] do
      raise ArgumentError,
            "invalid value for option :ip: expected an IP tuple, got: #{inspect(opts.ip)}"
    end

    if opts.handler && opts.connection_handler do
      raise ArgumentError, "a listener takes :handler or :connection_handler, not both"
    end

    if opts.handler == nil and opts.connection_handler == nil and not opts.active do
      raise ArgumentError,
            "a listener needs :handler, :connection_handler, or active: true to send connections to its owner"
    end

    ensure_module!(:handler, opts.handler, {:handle_data, 3})
    ensure_module!(:connection_handler, opts.connection_handler, {:handle_connection, 2})
    # With a handler of either kind, connections are not sent to the owner.
    opts = %{
      opts
      | active: opts.handler == nil and opts.connection_handler == nil and opts.active
    }

    opts =
      Map.put(opts, :stream_active, Quichex.Connection.stream_active!(opts.stream_opts, true))

    opts =
      Map.put(
        opts,
        :cid_generator,
        CID.generator!(opts.connection_id_generator, :connection_id_generator)
      )

    opts = %{opts | stateless_reset_key: reset_key!(opts.stateless_reset_key)}

    unless opts.accept_early_data == nil or is_function(opts.accept_early_data, 1) do
      raise ArgumentError,
            "invalid value for option :accept_early_data: expected a 1-arity function, got: #{inspect(opts.accept_early_data)}"
    end

    opts = %{opts | retry: retry!(opts.retry)}
    opts = %{opts | sockets: opts.sockets || System.schedulers_online()}
    opts = Map.put(opts, :retry_secret, :crypto.strong_rand_bytes(32))
    {client_cert, config} = client_cert!(opts.client_cert, config)
    opts = %{opts | client_cert: client_cert, config: config}

    no_early = Quichex.Config.put(config, :enable_early_data, false)

    with {:ok, native} <- Quichex.Config.build(config, :server),
         {:ok, native_no_early} <- Quichex.Config.build(no_early, :server),
         {:ok, port} <- free_port(opts.ip, opts.port) do
      opts
      |> Map.merge(%{native_config: native, native_config_no_early: native_no_early, port: port})
      |> start_supervisor()
    end
  end

  # The port is checked (and chosen, for port 0) by the caller with a plain
  # bind: a port in use is then an {:error, _} for the caller instead of a
  # failed start (a supervisor report, and an exit signal to the caller).
  # Without SO_REUSEPORT, so that a port another listener (or program)
  # holds is refused; the listener's own sockets then share it.
  defp free_port(ip, port) do
    with {:ok, probe, _caps} <- UDP.open(ip, port),
         {:ok, {_ip, port}} <- UDP.sockname(probe) do
      UDP.close(probe)
      {:ok, port}
    else
      {:error, reason} -> {:error, Quichex.TransportError.new({:socket, reason})}
    end
  end

  defp start_supervisor(opts) do
    case Supervisor.start_link(__MODULE__, opts) do
      {:error, {:shutdown, {:failed_to_start_child, _, reason}}} -> {:error, unwrap(reason)}
      other -> other
    end
  end

  defp retry!(true), do: :always
  defp retry!(false), do: :never
  defp retry!(mode) when mode in [:always, :never], do: mode
  defp retry!({:under_load, n} = mode) when is_integer(n) and n >= 0, do: mode

  defp retry!(other) do
    raise ArgumentError,
          "invalid value for option :retry: expected :always, :never or {:under_load, non_neg_integer}, got: #{inspect(other)}"
  end

  # verify_peer in the server's config asks quiche (BoringSSL) to verify a
  # certificate the client presents; requiring one is ours to check.
  defp client_cert!(nil, config) do
    if Quichex.Config.get(config, :verify_peer),
      do: {:require, config},
      else: {:none, config}
  end

  defp client_cert!(:none, config), do: {:none, Quichex.Config.put(config, :verify_peer, false)}

  defp client_cert!(mode, config) when mode in [:optional, :require],
    do: {mode, Quichex.Config.put(config, :verify_peer, true)}

  defp client_cert!(other, _config) do
    raise ArgumentError,
          "invalid value for option :client_cert: expected :none, :optional or :require, got: #{inspect(other)}"
  end

  defp reset_key!(nil), do: CID.new_key()
  defp reset_key!(key) when byte_size(key) >= 16, do: key

  defp reset_key!(key) do
    raise ArgumentError,
          "invalid value for option :stateless_reset_key: expected at least 16 bytes, got: #{inspect(key)}"
  end

  defp ensure_module!(_option, nil, _callback), do: :ok

  defp ensure_module!(option, module, {fun, arity}) do
    unless Code.ensure_loaded?(module) and function_exported?(module, fun, arity) do
      raise ArgumentError,
            "invalid value for option #{inspect(option)}: #{inspect(module)} is not available or does not define #{fun}/#{arity}"
    end
  end

  # A socket's start error, under the sockets' supervisor.
  defp unwrap({:failed_to_start_child, _id, reason}), do: unwrap(reason)
  defp unwrap({:shutdown, reason}), do: unwrap(reason)
  defp unwrap(reason), do: reason

  @doc """
  The `{ip, port}` the listener's sockets are bound to: `{:ok, {ip, port}}`,
  or #{@errors}.

      {:ok, {{127, 0, 0, 1}, port}} = Quichex.Listener.sockname(listener)
  """
  @spec sockname(t()) :: {:ok, {tuple(), :inet.port_number()}} | {:error, term()}
  def sockname(listener) do
    with :ok <- check(listener) do
      case children(listener) do
        %{shared: shared} ->
          case Registry.local(shared) do
            nil -> {:error, :closed}
            local -> {:ok, local}
          end

        _ ->
          {:error, :closed}
      end
    end
  end

  @doc """
  Counters, summed over the listener's sockets: `connections` (open now),
  `pending_handshakes` (of those, not established yet), `routes`
  (connection IDs in the routing table), `accepted`, `refused` (over
  `max_connections` or `max_pending_handshakes`), `unroutable` and
  `invalid` (dropped datagrams), `invalid_initial` (Initials that did not
  decrypt: dropped before any state was created), `version_negotiation`,
  `retry_sent`, `retry_validated`, `invalid_token`, `stateless_resets`,
  `datagrams_received`; and `sockets`, the same per-socket counters (no
  `connections`, `pending_handshakes` or `routes`) for each socket, in
  order. Errors: #{@errors}.

      {:ok, %{connections: 0, sockets: [_ | _]}} = Quichex.Listener.stats(listener)
  """
  @spec stats(t()) :: {:ok, map()} | {:error, term()}
  def stats(listener) do
    with :ok <- check(listener), do: stats_of(listener)
  end

  defp stats_of(listener) do
    case children(listener) do
      %{shared: shared, sockets: sockets} ->
        per_socket = Enum.map(sockets, &socket_stats/1)

        totals =
          Enum.reduce(per_socket, %{}, fn stats, acc ->
            Map.merge(acc, stats, fn _k, a, b -> a + b end)
          end)

        {:ok,
         Map.merge(totals, %{
           connections: Registry.connections(shared),
           pending_handshakes: Registry.pending(shared),
           routes: :ets.info(shared.routes, :size),
           sockets: per_socket
         })}

      _ ->
        {:error, :closed}
    end
  catch
    :exit, _ -> {:error, :closed}
  end

  # A socket restarting right now counts as empty.
  defp socket_stats(pid) do
    case Call.call(pid, {:quichex_listener, :stats}, 5_000, :not_a_listener) do
      {:ok, stats} -> stats
      _ -> %{}
    end
  end

  @doc """
  Stops the listener and every connection it accepted, waiting up to
  `timeout` (#{Schema.timeout_doc()}; default 5000; anything else raises
  `ArgumentError`).

  Returns `:ok`, also when the listener had already stopped;
  `{:error, :not_a_listener}` for a live process that is not a listener
  (which is left running), or `{:error, :timeout}` when the listener has
  not finished stopping within `timeout` (it goes on stopping).

      :ok = Quichex.Listener.stop(listener)
  """
  @spec stop(t(), timeout()) :: :ok | {:error, :not_a_listener | :timeout}
  def stop(listener, timeout \\ 5_000) do
    Schema.validate!(:timeout, :timeout, timeout)

    case check(listener) do
      :ok -> stop_supervisor(listener, timeout)
      {:error, :closed} -> :ok
      error -> error
    end
  end

  defp stop_supervisor(listener, timeout) do
    Supervisor.stop(listener, :normal, timeout)
  catch
    :exit, :timeout -> {:error, :timeout}
    :exit, _gone -> :ok
  end

  @doc """
  The live connections the listener accepted: `{:ok, [conn_pid]}`, or
  #{@errors}.

      {:ok, conns} = Quichex.Listener.connections(listener)
  """
  @spec connections(t()) :: {:ok, [pid()]} | {:error, term()}
  def connections(listener) do
    with :ok <- check(listener) do
      case children(listener) do
        %{connections: sup} when is_pid(sup) ->
          pids = for {_, pid, _, _} <- DynamicSupervisor.which_children(sup), is_pid(pid), do: pid
          {:ok, pids}

        _ ->
          {:error, :closed}
      end
    end
  catch
    :exit, _ -> {:error, :closed}
  end

  @doc false
  # The listener's processes: `registry`, `sockets` (socket pids in index
  # order), `socket` (the first), `sockets_sup` (their supervisor),
  # `connections` (the DynamicSupervisor).
  # (`%{}` for anything but a live listener).
  def children(listener) when is_pid(listener) do
    if Call.kind(listener) == :listener, do: children!(listener), else: %{}
  catch
    :exit, _ -> %{}
  end

  defp children!(listener) do
    top = Map.new(Supervisor.which_children(listener), fn {id, pid, _, _} -> {id, pid} end)

    sockets =
      case top do
        %{sockets: sup} when is_pid(sup) ->
          sup
          |> Supervisor.which_children()
          |> Enum.filter(fn {_id, pid, _, _} -> is_pid(pid) end)
          |> Enum.sort()
          |> Enum.map(fn {_id, pid, _, _} -> pid end)

        _ ->
          []
      end

    shared =
      case top do
        %{registry: registry} when is_pid(registry) -> Registry.shared(registry)
        _ -> nil
      end

    top
    |> Map.merge(%{sockets: sockets, socket: List.first(sockets), sockets_sup: top[:sockets]})
    |> then(fn map -> if shared, do: Map.put(map, :shared, shared), else: map end)
  end

  # Only a listener's own supervisor is a listener; any other call on it
  # could crash it (Quichex.Call).
  defp check(listener) when is_pid(listener) do
    cond do
      Call.kind(listener) == :listener -> :ok
      Call.alive?(listener) -> {:error, :not_a_listener}
      true -> {:error, :closed}
    end
  end

  defp check(other), do: raise(ArgumentError, "expected a listener pid, got: #{inspect(other)}")

  @impl Supervisor
  def init(opts) do
    :ok = Call.register(:listener)
    # The shared tables belong to this process: they live exactly as long
    # as the listener.
    opts = Map.merge(opts, %{listener: self(), shared: Registry.new_shared()})

    sockets =
      for index <- 0..(opts.sockets - 1) do
        %{
          id: {:socket, index},
          start: {Quichex.Listener.Socket, :start_link, [Map.put(opts, :index, index)]}
        }
      end

    children = [
      %{id: :registry, start: {Registry, :start_link, [opts]}},
      # Each socket process restarts on its own: the port, the routes and the
      # counters are in the shared tables.
      %{
        id: :sockets,
        start: {Quichex.Listener.Sockets, :start_link, [sockets]},
        type: :supervisor
      },
      %{
        id: :connections,
        start: {Quichex.Listener.Connections, :start_link, [opts.max_connections]},
        type: :supervisor
      }
    ]

    Supervisor.init(children, strategy: :rest_for_one, max_restarts: 0)
  end
end
