defmodule Quichex.Config do
  @schema [
    application_protos: [
      type: :alpn_list,
      default: nil,
      example: ["h3", "echo"],
      doc:
        "ALPN protocols, in order of preference: a non-empty list of 1..255 byte binaries. Required."
    ],
    max_idle_timeout: [
      type: :varint,
      default: 30_000,
      doc: "Idle timeout in milliseconds (0 disables it)."
    ],
    initial_max_data: [
      type: :varint,
      default: 10_000_000,
      doc: "Connection-level flow-control window, in bytes."
    ],
    initial_max_stream_data_bidi_local: [
      type: :varint,
      default: 1_000_000,
      doc: "Flow-control window for bidirectional streams we open, in bytes."
    ],
    initial_max_stream_data_bidi_remote: [
      type: :varint,
      default: 1_000_000,
      doc: "Flow-control window for bidirectional streams the peer opens, in bytes."
    ],
    initial_max_stream_data_uni: [
      type: :varint,
      default: 1_000_000,
      doc: "Flow-control window for unidirectional streams the peer opens, in bytes."
    ],
    initial_max_streams_bidi: [
      type: {:integer, 0, 1_152_921_504_606_846_976},
      default: 100,
      doc: "How many bidirectional streams the peer may open."
    ],
    initial_max_streams_uni: [
      type: {:integer, 0, 1_152_921_504_606_846_976},
      default: 100,
      doc: "How many unidirectional streams the peer may open."
    ],
    max_recv_udp_payload_size: [
      type: {:integer, 1200, 65527},
      default: nil,
      doc: "Largest UDP payload we accept (quiche default 65527)."
    ],
    max_send_udp_payload_size: [
      type: {:integer, 1200, 65527},
      default: 1350,
      doc: "Largest UDP payload we send."
    ],
    ack_delay_exponent: [
      type: {:integer, 0, 20},
      default: nil,
      doc: "ACK delay exponent transport parameter (quiche default 3)."
    ],
    max_ack_delay: [
      type: {:integer, 0, 16383},
      default: nil,
      doc: "Maximum ACK delay in milliseconds (quiche default 25)."
    ],
    disable_active_migration: [
      type: :boolean,
      default: nil,
      doc: "Tell the peer not to migrate (quiche default false)."
    ],
    active_connection_id_limit: [
      type: {:integer, 2, Quichex.Config.Schema.max_varint()},
      default: nil,
      doc: "How many connection IDs we accept from the peer (quiche default 2)."
    ],
    cc_algorithm: [
      type: {:in, [:reno, :cubic, :bbr, :bbr2]},
      default: :cubic,
      doc:
        "Congestion control: `:reno`, `:cubic`, or `:bbr` / `:bbr2` (both quiche 0.30's BBRv2)."
    ],
    enable_hystart: [type: :boolean, default: nil, doc: "HyStart++ (quiche default true)."],
    enable_pacing: [
      type: :boolean,
      default: nil,
      doc:
        "Pacing (quiche default true): packets leave when quiche's pacer says, in batches of at most its send quantum. quiche 0.30 paces with `cc_algorithm: :bbr` only; Reno and CUBIC send at once."
    ],
    max_pacing_rate: [
      type: {:integer, 1, 18_446_744_073_709_551_615},
      default: nil,
      doc:
        "Cap on the pacing rate, in megabits per second (as quiche 0.30's BBRv2 reads it; no effect with Reno or CUBIC)."
    ],
    enable_dgram: [
      type: :boolean,
      default: false,
      doc: "Enable DATAGRAM frames (RFC 9221)."
    ],
    dgram_recv_queue_len: [
      type: {:integer, 1, 1_000_000},
      default: 1000,
      doc: "Datagram receive queue length, used with `enable_dgram`."
    ],
    dgram_send_queue_len: [
      type: {:integer, 1, 1_000_000},
      default: 1000,
      doc: "Datagram send queue length, used with `enable_dgram`."
    ],
    verify_peer: [
      type: :boolean,
      default: nil,
      doc:
        "Verify the peer's certificate. When unset: `true` for client connections, `false` for listeners."
    ],
    load_cert_chain_from_pem_file: [
      type: :path,
      default: nil,
      example: "priv/cert.pem",
      doc: "PEM certificate chain file (required for listeners)."
    ],
    load_priv_key_from_pem_file: [
      type: :path,
      default: nil,
      example: "priv/key.pem",
      doc: "PEM private key file matching the certificate (required for listeners)."
    ],
    load_verify_locations_from_file: [
      type: :path,
      default: nil,
      example: "priv/ca.pem",
      doc: "PEM file of trusted CA certificates."
    ],
    load_verify_locations_from_directory: [
      type: :path,
      default: nil,
      example: "/etc/ssl/certs",
      doc: "Directory of trusted CA certificates."
    ],
    grease: [type: :boolean, default: nil, doc: "Send GREASE values (quiche default true)."],
    keylog_file: [
      type: :path,
      default: nil,
      example: "/tmp/quic-keys.log",
      doc:
        "Append TLS secrets to this file in the NSS key log format, so Wireshark can decrypt captures. When unset, the file named by the `SSLKEYLOGFILE` environment variable is used, as browsers and curl do."
    ],
    qlog_dir: [
      type: :path,
      default: nil,
      example: "/tmp/qlog",
      doc:
        "Write one qlog file (JSON-SEQ, `<trace_id>.sqlog`) per connection into this existing directory. A file that cannot be written never affects the connection; the failure is reported once as a `[:quichex, :connection, :log_failed]` telemetry event."
    ],
    qlog_level: [
      type: {:in, [:core, :base, :extra]},
      default: :base,
      doc: "How much a qlog records: `:core`, `:base` or `:extra` events (with `qlog_dir`)."
    ],
    enable_early_data: [type: :boolean, default: false, doc: "Accept and send 0-RTT data."],
    discover_pmtu: [
      type: :boolean,
      default: nil,
      doc: "Path MTU discovery (quiche default false)."
    ],
    max_connection_window: [
      type: {:integer, 1, Quichex.Config.Schema.max_varint()},
      default: nil,
      doc: "Largest connection flow-control window auto-tuning may reach, in bytes."
    ],
    max_stream_window: [
      type: {:integer, 1, Quichex.Config.Schema.max_varint()},
      default: nil,
      doc: "Largest stream flow-control window auto-tuning may reach, in bytes."
    ],
    max_amplification_factor: [
      type: {:integer, 1, 3},
      default: nil,
      doc:
        "Servers: at most this many bytes sent per byte received before the client's address is validated (default 3, the most RFC 9000 section 8.1 allows)."
    ],
    initial_congestion_window_packets: [
      type: {:integer, 1, 100_000},
      default: nil,
      doc: "Initial congestion window, in packets (quiche default 10)."
    ],
    ticket_key: [
      type: :ticket_key,
      default: nil,
      example: "0123456789abcdef0123456789abcdef0123456789abcdef",
      doc: "48-byte key for TLS session tickets (servers sharing tickets use the same key)."
    ]
  ]

  @option_docs Quichex.Config.Schema.docs(@schema)

  @moduledoc """
  QUIC configuration: plain Elixir data, validated when built, turned into a
  `quiche::Config` by the NIF when a connection or listener starts.

  Two equivalent forms:

      iex> config = Quichex.Config.new(application_protos: ["echo"], max_idle_timeout: 5_000)
      iex> Quichex.Config.get(config, :max_idle_timeout)
      5000

      iex> config =
      ...>   Quichex.Config.new()
      ...>   |> Quichex.Config.set_application_protos(["echo"])
      ...>   |> Quichex.Config.set_cc_algorithm(:bbr)
      iex> Quichex.Config.get(config, :cc_algorithm)
      :bbr

  Every setter is `set_<option>/2`, except the TLS file options, whose
  setters carry quiche's names (`load_cert_chain_from_pem_file/2`, ...).
  A bad value raises `ArgumentError` naming the option and what it expected.

  TLS files are read when a connection or listener starts (or by `check/1`):
  a missing file, bad PEM or a key that does not match the certificate is
  returned as `{:error, %Quichex.TransportError{reason: {:tls_file, option, path}}}`.

  ## Options

  #{@option_docs}
  """

  alias Quichex.Config.Schema

  defstruct options: %{}

  @cache :quichex_config_cache
  @cache_size 64

  @typedoc "A validated configuration. Read it with `get/2`; change it with the setters."
  @type t :: %__MODULE__{options: %{optional(atom()) => term()}}

  @doc false
  def __schema__, do: @schema

  @doc """
  Returns a config with the library defaults, then applies `opts`.

  Raises `ArgumentError` for an unknown option or a bad value.

      iex> Quichex.Config.new(initial_max_streams_bidi: 10) |> Quichex.Config.get(:initial_max_streams_bidi)
      10
  """
  @spec new(keyword()) :: t()
  def new(opts \\ []) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "Quichex.Config.new/1 expects a keyword list, got: #{inspect(opts)}"
    end

    opts = Keyword.validate!(opts, Keyword.keys(@schema))
    Enum.reduce(opts, %__MODULE__{}, fn {key, value}, config -> put(config, key, value) end)
  end

  @doc """
  Returns an option's value (its default when it was never set). Raises
  `ArgumentError` for a key that is not an option.

      iex> Quichex.Config.new() |> Quichex.Config.get(:cc_algorithm)
      :cubic
  """
  @spec get(t(), atom()) :: term()
  def get(%__MODULE__{options: options}, key) when is_atom(key) do
    case Map.fetch(options, key) do
      {:ok, value} -> value
      :error -> spec!(key)[:default]
    end
  end

  defp spec!(key) do
    case List.keyfind(@schema, key, 0) do
      {^key, spec} -> spec
      nil -> raise ArgumentError, "unknown Quichex.Config option #{inspect(key, limit: 10)}"
    end
  end

  @doc """
  Sets one option by name, validating it: an unknown option or a bad value
  raises `ArgumentError` naming the option.

      iex> Quichex.Config.new() |> Quichex.Config.put(:grease, false) |> Quichex.Config.get(:grease)
      false
  """
  @spec put(t(), atom(), term()) :: t()
  def put(%__MODULE__{} = config, key, value) do
    spec = spec!(key)
    Schema.validate!(key, spec[:type], value)
    %{config | options: Map.put(config.options, key, value)}
  end

  for {name, spec} <- @schema do
    setter =
      case Atom.to_string(name) do
        "load_" <> _ = fun -> String.to_atom(fun)
        fun -> String.to_atom("set_" <> fun)
      end

    example = inspect(Schema.example(spec))

    @doc """
    Sets `#{inspect(name)}`: #{spec[:doc]}

        iex> config = Quichex.Config.new() |> Quichex.Config.#{setter}(#{example})
        iex> Quichex.Config.get(config, #{inspect(name)})
        #{example}
    """
    @spec unquote(setter)(t(), term()) :: t()
    def unquote(setter)(%__MODULE__{} = config, value), do: put(config, unquote(name), value)
  end

  @doc """
  Builds the config in the NIF now, reading its TLS files, to learn of
  problems before a connection or listener starts.

      iex> Quichex.Config.new(application_protos: ["x"]) |> Quichex.Config.check()
      :ok
  """
  @spec check(t(), :client | :server) :: :ok | {:error, Quichex.TransportError.t()}
  def check(%__MODULE__{} = config, role \\ :client) when role in [:client, :server] do
    with {:ok, _native} <- build(config, role), do: :ok
  end

  @doc false
  # Builds the native quiche config for a client or a server.
  @spec build(t(), :client | :server) :: {:ok, reference()} | {:error, Quichex.TransportError.t()}
  def build(%__MODULE__{} = config, role) when role in [:client, :server] do
    # Building a quiche::Config creates a TLS context and reads certificate
    # files (milliseconds), so native configs are cached per config value.
    key = {config.options, role, System.get_env("SSLKEYLOGFILE")}

    case :ets.lookup(@cache, key) do
      [{_, native}] ->
        {:ok, native}

      [] ->
        case Quichex.Native.config_build(to_native(config, role)) do
          {:ok, native} ->
            if :ets.info(@cache, :size) >= @cache_size, do: :ets.delete_all_objects(@cache)
            :ets.insert(@cache, {key, native})
            {:ok, native}

          {:error, reason} ->
            {:error, Quichex.TransportError.new(reason)}
        end
    end
  end

  @doc """
  Forgets the native configs built so far. Connections and listeners build a
  config's TLS context once per config value and reuse it; call this after
  replacing certificate or key files on disk under the same paths.

      iex> Quichex.Config.clear_cache()
      :ok
  """
  @spec clear_cache() :: :ok
  def clear_cache do
    :ets.delete_all_objects(@cache)
    :ok
  end

  @doc false
  @spec create_cache() :: :ok
  def create_cache do
    @cache = :ets.new(@cache, [:named_table, :public, :set, read_concurrency: true])
    :ok
  end

  @doc false
  # The `[{name, value}]` list the NIF decodes: every option that is set or
  # has a library default, with role-dependent defaults resolved.
  def to_native(%__MODULE__{} = config, role, keylog_env \\ System.get_env("SSLKEYLOGFILE")) do
    dgram =
      {:enable_dgram,
       {get(config, :enable_dgram), get(config, :dgram_recv_queue_len),
        get(config, :dgram_send_queue_len)}}

    verify =
      case get(config, :verify_peer) do
        nil -> role == :client
        value -> value
      end

    qlog =
      case get(config, :qlog_dir) do
        nil -> []
        dir -> [{:qlog_dir, {dir, get(config, :qlog_level)}}]
      end

    keylog =
      case get(config, :keylog_file) || keylog_env do
        path when is_binary(path) and path != "" -> [{:keylog_file, path}]
        _ -> []
      end

    skip = [
      :enable_dgram,
      :dgram_recv_queue_len,
      :dgram_send_queue_len,
      :verify_peer,
      :qlog_dir,
      :qlog_level,
      :keylog_file
    ]

    plain =
      for {name, _spec} <- @schema, name not in skip, {:ok, value} <- [fetch_set(config, name)] do
        {name, value}
      end

    [dgram, {:verify_peer, verify} | qlog ++ keylog ++ plain]
  end

  defp fetch_set(config, name) do
    case get(config, name) do
      nil -> :error
      value -> {:ok, value}
    end
  end

  @doc false
  # The datagram settings a connection needs (Quichex.Connection.Datagrams).
  def dgram_opts(%__MODULE__{} = config) do
    [
      enabled: get(config, :enable_dgram),
      send_queue_len: get(config, :dgram_send_queue_len),
      recv_queue_len: get(config, :dgram_recv_queue_len)
    ]
  end

  ## The plan's names

  @doc """
  Whether to verify the peer's certificate (the plan's name for
  `set_verify_peer/2`).

      iex> Quichex.Config.new() |> Quichex.Config.verify_peer(false) |> Quichex.Config.get(:verify_peer)
      false
  """
  @spec verify_peer(t(), boolean()) :: t()
  def verify_peer(%__MODULE__{} = config, verify), do: put(config, :verify_peer, verify)

  @doc """
  Whether to send GREASE values (the plan's name for `set_grease/2`).

      iex> Quichex.Config.new() |> Quichex.Config.grease(false) |> Quichex.Config.get(:grease)
      false
  """
  @spec grease(t(), boolean()) :: t()
  def grease(%__MODULE__{} = config, grease), do: put(config, :grease, grease)

  @doc """
  Enables (or disables) DATAGRAM frames (RFC 9221) with the lengths of the
  receive and send queues (`recv_queue_len:`, `send_queue_len:`, default
  1000 each).

      iex> config = Quichex.Config.new() |> Quichex.Config.enable_dgram(true, recv_queue_len: 100, send_queue_len: 50)
      iex> {Quichex.Config.get(config, :enable_dgram), Quichex.Config.get(config, :dgram_send_queue_len)}
      {true, 50}
  """
  @spec enable_dgram(t(), boolean(), keyword()) :: t()
  def enable_dgram(%__MODULE__{} = config, enabled, opts \\ []) do
    opts = Schema.validate_keyword!(opts, recv_queue_len: 1000, send_queue_len: 1000)

    config
    |> put(:enable_dgram, enabled)
    |> put(:dgram_recv_queue_len, opts[:recv_queue_len])
    |> put(:dgram_send_queue_len, opts[:send_queue_len])
  end

  # Where Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine, macOS (Homebrew) and
  # FreeBSD keep their CA bundle.
  @system_ca_files [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
    "/usr/local/share/certs/ca-root-nss.crt"
  ]

  @doc """
  Trusts the operating system's CA certificates: sets
  `:load_verify_locations_from_file` to the first CA bundle found (the
  `SSL_CERT_FILE` environment variable first, then the usual places of
  Debian, Fedora, openSUSE, Alpine, macOS and FreeBSD). Raises
  `Quichex.TransportError` with `reason: :no_system_ca_certs` when there is
  none.

      config = Quichex.Config.new(application_protos: ["h3"]) |> Quichex.Config.load_system_ca_certs()
  """
  @spec load_system_ca_certs(t()) :: t()
  def load_system_ca_certs(%__MODULE__{} = config) do
    candidates = [System.get_env("SSL_CERT_FILE") | @system_ca_files]

    case Enum.find(candidates, &(is_binary(&1) and &1 != "" and File.regular?(&1))) do
      nil -> raise Quichex.TransportError.new(:no_system_ca_certs)
      path -> put(config, :load_verify_locations_from_file, path)
    end
  end

  @doc """
  Returns the options as a keyword list with defaults filled in.

      iex> Quichex.Config.new() |> Quichex.Config.to_list() |> Keyword.fetch!(:max_idle_timeout)
      30000
  """
  @spec to_list(t()) :: keyword()
  def to_list(%__MODULE__{} = config) do
    for {name, _} <- @schema, do: {name, get(config, name)}
  end
end
