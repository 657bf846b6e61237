defmodule Quichex.TransportError do
  @moduledoc """
  An error below the application: name resolution, the socket, TLS or the
  QUIC transport. Returned by `Quichex.Connection.connect/1`,
  `Quichex.Listener.start_link/1` and `Quichex.Config.check/2`, and the
  `reason` of `{:quic_connection_error, conn, reason}` and
  `{:quic_connection_closed, conn, code, reason}`.

  `reason` is one of:

    * `:handshake_timeout` - the handshake did not finish within `:handshake_timeout`
    * `:idle_timeout` - the connection was idle longer than `max_idle_timeout`
    * `:closed` - quiche closed the connection without an error code
    * `{:resolve, posix}` - the host name could not be resolved (e.g. `:nxdomain`)
    * `{:socket, posix}` - a socket call failed (e.g. `:eaddrinuse`)
    * `{:tls_file, option, path}` - a certificate, key or CA file could not be
      loaded: missing, not PEM, or a key that does not match the certificate
    * `{:invalid_option, name}` - the NIF rejected a config option
    * `:no_system_ca_certs` - `Quichex.Config.load_system_ca_certs/1` found
      no CA bundle on this system
    * `:invalid_session` - the `:session` given to
      `Quichex.Connection.connect/1` is not a session ticket quiche can resume
    * `:stateless_reset` - the peer answered with a stateless reset: it has
      no state for this connection (e.g. it restarted)
    * `{:transport, code, reason_phrase}` - a CONNECTION_CLOSE with a transport
      error code, sent by the peer or by us; codes `0x100..0x1ff` are TLS
      alerts (`0x178` no application protocol, `0x12a` bad certificate, ...)
    * a quiche error atom when quiche refuses to create a connection or a
      stream, such as `:tls_fail` or `{:invalid_stream_state, id}`

  Calls that merely time out or find the connection gone return the plain
  atoms `{:error, :timeout}` and `{:error, :closed}`, not this struct.

      case Quichex.Connection.connect(host: "example.invalid", port: 4433, config: config) do
        {:ok, conn} -> {:ok, conn}
        {:error, %Quichex.TransportError{reason: {:resolve, _}} = error} -> {:error, Exception.message(error)}
      end

  Its message says what failed:

      iex> Exception.message(%Quichex.TransportError{reason: :handshake_timeout})
      "handshake timed out"

      iex> Exception.message(%Quichex.TransportError{reason: {:transport, 0x178, "no ALPN"}})
      ~s[transport error 0x178 (TLS alert 120): "no ALPN"]
  """

  defexception [:reason]

  @type t :: %__MODULE__{reason: term()}

  @doc false
  # The one constructor the library uses.
  def new(reason), do: %__MODULE__{reason: reason}

  @impl true
  def message(%__MODULE__{reason: reason}), do: format(reason)

  defp format(:closed), do: "connection closed"
  defp format(:handshake_timeout), do: "handshake timed out"
  defp format(:idle_timeout), do: "idle timeout"
  defp format({:resolve, posix}), do: "cannot resolve host: #{:inet.format_error(posix)}"
  defp format({:socket, posix}), do: "socket error: #{inspect(posix)}"

  defp format({:tls_file, option, path}),
    do: "cannot load #{option} from #{inspect(path)} (missing, not PEM, or key/cert mismatch)"

  defp format({:invalid_option, name}), do: "invalid config option #{name}"
  defp format(:no_system_ca_certs), do: "no system CA certificates found (set SSL_CERT_FILE)"
  defp format(:invalid_session), do: "the session ticket cannot be resumed"
  defp format(:stateless_reset), do: "the peer reset the connection (stateless reset)"

  defp format({:transport, code, phrase}) do
    alert = if code in 0x100..0x1FF, do: " (TLS alert #{code - 0x100})", else: ""
    "transport error 0x#{Integer.to_string(code, 16)}#{alert}: #{inspect(phrase)}"
  end

  defp format(other), do: "QUIC error: #{inspect(other)}"
end
