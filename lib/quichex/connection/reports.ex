defmodule Quichex.Connection.Reports do
  @moduledoc false
  # What a connection tells the outside: stats/1 and info/1 answers, the
  # reason a connection closed, the messages to its controlling process,
  # and telemetry metadata. The one place connection errors are built.

  alias Quichex.{ApplicationError, Native, TransportError}
  alias Quichex.Connection.{State, Streams}

  # Application error code sent when the controlling process exits.
  @owner_down_code 0

  def owner_down_code, do: @owner_down_code

  @doc "The `stats/2` answer."
  def stats(%State{} = data) do
    {:ok, s} = Native.connection_stats(data.native)

    stats =
      s
      |> Map.put(:streams, Streams.count(data.streams))
      |> Map.put(:paced_batches, data.paced_count)
      |> Map.merge(Quichex.Connection.Datagrams.stats(data.dgrams))

    {:ok, stats}
  end

  @doc "Emits the connection event `[:quichex, :connection, name]`."
  def event(%State{} = data, name, measurements, metadata \\ %{}) do
    Quichex.Telemetry.execute(
      [:quichex, :connection, name],
      measurements,
      Map.merge(telemetry_meta(data), metadata)
    )
  end

  @doc "The `info/2` answer."
  def info(state, %State{} = data) do
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
       is_resumed: i.is_resumed,
       resumed: i.is_resumed,
       early_data: early_data_outcome(data, i),
       state: state,
       retry: retry_used?(data, i),
       source_id: i.source_id,
       destination_id: i.destination_id,
       peer_cert: i.peer_cert,
       peer_cert_chain: i.peer_cert_chain || [],
       peer_transport_params: i.peer_transport_params,
       max_send_udp_payload_size: i.max_send_udp_payload_size,
       gso: data.gso,
       trace_id: i.trace_id
     }}
  end

  @doc """
  What became of 0-RTT: `:accepted`, `:rejected` or `:none` (not tried),
  from quiche's (BoringSSL's) early data reason; `{:rejected, reason}` as
  told to a client's owner.
  """
  def early_data_outcome(%State{role: :client, early_data: false}, _info), do: :none

  def early_data_outcome(%State{role: :client}, %{early_data_reason: 2}), do: :accepted
  def early_data_outcome(%State{role: :client}, _info), do: :rejected

  # A server: accepted; :none when the client offered none (peer_declined,
  # no_session_offered, unknown) or our config disables 0-RTT (BoringSSL
  # then does not say whether the client offered any); otherwise refused.
  def early_data_outcome(%State{role: :server}, %{early_data_reason: 2}), do: :accepted

  def early_data_outcome(%State{role: :server}, %{early_data_reason: r}) when r in [0, 1, 4, 5],
    do: :none

  def early_data_outcome(%State{role: :server}, _info), do: :rejected

  @early_data_reasons %{
    0 => :unknown,
    1 => :disabled,
    3 => :protocol_version,
    4 => :peer_declined,
    5 => :no_session_offered,
    6 => :session_not_resumed,
    7 => :unsupported_for_session,
    8 => :hello_retry_request,
    9 => :alpn_mismatch,
    10 => :channel_id,
    12 => :ticket_age_skew,
    13 => :quic_parameter_mismatch,
    14 => :alps_mismatch
  }

  @doc "Why early data was not accepted, as an atom."
  def early_data_reason(%{early_data_reason: r}), do: Map.get(@early_data_reasons, r, :unknown)

  @doc "Whether Retry validated this connection's address."
  def retry_used?(%State{role: :server, retry: retry}, _info), do: retry
  def retry_used?(_data, info), do: match?(%{retry_used: true}, info.peer_transport_params)

  @doc """
  `{error_code, reason}` for the close messages, from how the close began
  (`data.closing`) or what quiche recorded.
  """
  def close_reason(state, %State{} = data) do
    {:ok, info} = Native.connection_info(data.native)

    cond do
      data.closing == :local ->
        {data.close_code, :local}

      # :refused (a server refusing a client during the handshake) falls
      # through to the error quiche recorded for the close.

      data.closing == :owner_down ->
        {@owner_down_code, :owner_down}

      info.stateless_reset ->
        {0, transport_error(:stateless_reset)}

      info.peer_error != nil ->
        peer_error(info.peer_error)

      info.is_timed_out and state == :handshaking ->
        {0, transport_error(:handshake_timeout)}

      info.is_timed_out ->
        {0, transport_error(:idle_timeout)}

      info.local_error != nil ->
        {_app?, code, phrase} = info.local_error
        {code, transport_error({:transport, code, phrase})}

      true ->
        {0, transport_error(:closed)}
    end
  end

  defp peer_error({true, code, phrase}),
    do: {code, ApplicationError.new(code, phrase)}

  defp peer_error({false, code, phrase}),
    do: {code, transport_error({:transport, code, phrase})}

  @doc "A `Quichex.TransportError` with `reason`."
  def transport_error(reason), do: TransportError.new(reason)

  @doc "Tells the owner and every wait_connected/2 caller that the connection ended."
  def notify_closed(:handshaking, %State{} = data) do
    reason = data.close_reason
    Enum.each(data.waiters, &:gen_statem.reply(&1, {:error, reason}))

    # A listener's owner hears of a connection only once it is established.
    if data.role == :client, do: notify_owner(data, {:quic_connection_error, self(), reason})
  end

  def notify_closed(_state, %State{} = data) do
    notify_owner(data, {:quic_connection_closed, self(), data.close_code, data.close_reason})
  end

  @doc "Sends `msg` to the controlling process in active mode."
  def notify_owner(%State{active: true, owner: owner, owner_ref: ref}, msg)
      when is_pid(owner) and ref != nil do
    send(owner, msg)
    :ok
  end

  def notify_owner(_data, _msg), do: :ok

  @doc "Telemetry metadata shared by every connection event."
  def telemetry_meta(%State{} = data),
    do: %{connection: self(), role: data.role, peer_address: data.peer}

  @doc "Measurements of the `[:quichex, :connection, :stop]` event."
  def stop_measurements(%State{} = data) do
    {:ok, s} = Native.connection_stats(data.native)

    %{
      bytes_sent: s.bytes_sent,
      bytes_received: s.bytes_received,
      packets_sent: s.packets_sent,
      packets_received: s.packets_received,
      packets_lost: s.packets_lost
    }
  end
end
