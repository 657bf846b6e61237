defmodule Quichex do
  @moduledoc """
  QUIC for Elixir: connections are `:gen_statem` processes, streams are
  processes, quiche (through a sans-IO Rust NIF) does the protocol.

    * `Quichex.Config` - TLS and transport settings
    * `Quichex.Connection` - client connections and connection calls
    * `Quichex.Stream` - stream processes: send, receive, shutdown
    * `Quichex.Listener` - servers
    * `Quichex.Handler` - a behaviour to serve connections and streams
    * `Quichex.Telemetry` - events

  ## Example

      config = Quichex.Config.new(application_protos: ["echo"], verify_peer: false)
      {:ok, conn} = Quichex.connect("localhost", 4433, config)
      :ok = Quichex.Connection.wait_connected(conn)
  """

  @doc """
  The quiche version the NIF is built against.

      iex> Quichex.quiche_version()
      "0.30.0"
  """
  @spec quiche_version() :: String.t()
  def quiche_version, do: Quichex.Native.quiche_version()

  @doc """
  Shorthand for `Quichex.Connection.connect/1`.

      {:ok, conn} = Quichex.connect("localhost", 4433, config, handshake_timeout: 2_000)
  """
  @spec connect(
          String.t() | :inet.ip_address(),
          :inet.port_number(),
          Quichex.Config.t(),
          keyword()
        ) ::
          {:ok, pid()} | {:error, term()}
  def connect(host, port, config, opts \\ []) do
    Quichex.Connection.connect([host: host, port: port, config: config] ++ opts)
  end

  @doc """
  A child spec for a listener, the same as `Quichex.Listener.child_spec/1`:

      children = [{Quichex, port: 4433, config: config, handler: MyHandler}]
      Supervisor.start_link(children, strategy: :one_for_one)
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts), do: Quichex.Listener.child_spec(opts)
end
